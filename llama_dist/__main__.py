import sys

from llama_dist.cli import main

sys.exit(main())
