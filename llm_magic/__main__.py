from llm_magic.cli import main

raise SystemExit(main())
