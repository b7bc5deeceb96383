from vita_ext.cli import main

raise SystemExit(main())
