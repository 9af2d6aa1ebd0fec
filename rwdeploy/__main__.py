import sys

from rwdeploy.cli import main

sys.exit(main())
