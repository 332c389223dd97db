import sys

from onnxcomp.cli.main import main

sys.exit(main())
