"""`python -m llmexec ...` is the `llmexec` command."""

import sys

from llmexec.cli.main import main

sys.exit(main())
