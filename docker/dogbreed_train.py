"""The train image's SAGEMAKER_PROGRAM: sagemaker-training's `train` runs

    python /opt/dogbreed/dogbreed_train.py --<hyperparameter> <value> ...

and this hands over to the package's entry point (the same code as `dogbreed-train`). It lives
outside /opt/ml so that mounting a host folder over /opt/ml cannot hide it. It starts through
dogbreed.stopping, which handles SIGTERM/SIGINT before torch is imported.
"""

import sys

from dogbreed.stopping import main

if __name__ == "__main__":
    sys.exit(main())
