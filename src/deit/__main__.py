from deit.cli import main

raise SystemExit(main())
