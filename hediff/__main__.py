from hediff.desktop.cli import main

raise SystemExit(main())
