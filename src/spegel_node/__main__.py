from spegel_node.cli import main

raise SystemExit(main())
