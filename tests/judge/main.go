// Command judge reports how one containerd version reads a hosts dir for one registry, using
// that version's own remotes/docker/config package (built by tests/peers/build.py). Written
// with 1.x's import paths; for 2.x the build rewrites them to containerd/v2/core/remotes.
//
//	judge HOSTS_ROOT REGISTRY_HOST
//	judge HOSTS_ROOT -   (registry hosts on stdin, one a line; one JSON line out for each)
//
// prints {"status": "used"|"dropped"|"error"|"panic", "error": "...", "hosts": [...]}:
// "dropped" is a hosts.toml containerd only logs about and ignores (the pull goes upstream),
// "error" is ConfigureHosts failing (the pull itself fails), "panic" is the parser panicking.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"

	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/containerd/remotes/docker/config"
	"github.com/sirupsen/logrus"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: judge HOSTS_ROOT REGISTRY_HOST")
		os.Exit(2)
	}
	hosts := []string{os.Args[2]}
	if os.Args[2] == "-" {
		hosts = nil
		in := bufio.NewScanner(os.Stdin)
		for in.Scan() {
			hosts = append(hosts, in.Text())
		}
	}
	for _, host := range hosts {
		judge(os.Args[1], host)
	}
}

func judge(root, host string) {
	report(root, host, func(ctx context.Context, root, host string) ([]docker.RegistryHost, error) {
		return config.ConfigureHosts(ctx, config.HostOptions{HostDir: config.HostDirFromRoot(root)})(host)
	}, func(h docker.RegistryHost) (string, uint) {
		return h.Scheme + "://" + h.Host + h.Path, uint(h.Capabilities)
	})
}

type hostOut struct {
	URL          string   `json:"url"`
	Capabilities []string `json:"capabilities"`
}

type result struct {
	Status string    `json:"status"`
	Error  string    `json:"error"`
	Hosts  []hostOut `json:"hosts"`
}

var capNames = []string{"pull", "resolve", "push", "referrers"}

func report[H any](root, host string, configure func(context.Context, string, string) ([]H, error), describe func(H) (string, uint)) {
	var logs bytes.Buffer
	logrus.SetOutput(&logs)
	logrus.SetFormatter(&logrus.JSONFormatter{})
	logrus.SetLevel(logrus.WarnLevel)
	res := result{Status: "used", Hosts: []hostOut{}}
	func() {
		defer func() {
			if r := recover(); r != nil {
				res.Status, res.Error = "panic", fmt.Sprint(r)
			}
		}()
		hosts, err := configure(context.Background(), root, host)
		if err != nil {
			res.Status, res.Error = "error", err.Error()
			return
		}
		for _, h := range hosts {
			url, caps := describe(h)
			out := hostOut{URL: url, Capabilities: []string{}}
			for i, name := range capNames {
				if caps&(1<<uint(i)) != 0 {
					out.Capabilities = append(out.Capabilities, name)
				}
			}
			res.Hosts = append(res.Hosts, out)
		}
	}()
	if res.Status == "used" {
		for _, line := range bytes.Split(logs.Bytes(), []byte("\n")) {
			var entry map[string]any
			if json.Unmarshal(line, &entry) != nil || entry["level"] != "error" {
				continue
			}
			res.Status = "dropped"
			res.Error = fmt.Sprint(entry["msg"], ": ", entry["error"])
			break
		}
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(res)
}
