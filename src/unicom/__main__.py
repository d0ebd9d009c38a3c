from unicom.cli import main

raise SystemExit(main())
