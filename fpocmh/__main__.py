from fpocmh.cli import main

raise SystemExit(main())
