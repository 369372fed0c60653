#!/bin/sh
# Entry script of the train image, run under `tini -g` (PID 1, see Dockerfile.train).
#
# `train` (what SageMaker runs: `docker run <image> train`) goes to sagemaker-training's `train`,
# which runs $SAGEMAKER_PROGRAM. `serve` is refused with one line naming the serve image. Any
# other command runs as given (`docker run <image> bash`).
#
# For `train`:
# - Config files SageMaker always writes but a bare `docker run` may lack are filled in, so a
#   host folder mounted at /opt/ml with just data (and hyperparameters.json) is a valid job:
#   hyperparameters.json = {}, resourceconfig.json = one host "localhost" (sagemaker-training
#   waits for the hosts to resolve), inputdataconfig.json = one File channel per folder under
#   input/data. Existing files are never touched.
# - SIGTERM (StopTrainingJob, `docker stop`): tini -g sends it to the whole process group. The
#   toolkit starts with SIGTERM ignored (set here, inherited across exec) so it keeps waiting
#   while the training process, which installs its own handler, checkpoints and exits; the
#   toolkit then reports that exit code. Without this the toolkit would die first and take the
#   training process with it.
set -eu

fill_training_config() {
    base=${SAGEMAKER_BASE_DIR:-/opt/ml}
    config=$base/input/config
    if ! mkdir -p "$config" 2>/dev/null || [ ! -w "$config" ]; then
        echo "dogbreed: $config is not writable; expecting SageMaker's config files there" >&2
        return 0
    fi
    [ -e "$config/hyperparameters.json" ] || echo '{}' > "$config/hyperparameters.json"
    [ -e "$config/resourceconfig.json" ] ||
        echo '{"current_host": "localhost", "hosts": ["localhost"]}' > "$config/resourceconfig.json"
    if [ ! -e "$config/inputdataconfig.json" ]; then
        channels=""
        for dir in "$base"/input/data/*/; do
            [ -d "$dir" ] || continue
            name=$(basename "$dir")
            channels="$channels${channels:+, }\"$name\": {\"TrainingInputMode\": \"File\"}"
        done
        echo "{$channels}" > "$config/inputdataconfig.json"
    fi
}

# NVIDIA's CUDA forward-compatibility libraries (images built FROM an nvidia/cuda base carry
# them in /usr/local/cuda/compat): on LD_LIBRARY_PATH only when the host driver is older than
# theirs, as AWS's start_cuda_compat.sh does (dogbreed/gpu.py). Before anything loads libcuda.
if compat_env=$(python -m dogbreed.gpu compat-env); then
    eval "$compat_env"
fi

case "${1:-}" in
    train)
        fill_training_config
        trap '' TERM
        ;;
    serve)
        # SageMaker runs `serve` when this image is given to a Model/endpoint (estimator.deploy()
        # without image_uri does that): one line naming the right image, not a confusing exec error.
        echo "dogbreed: this is the train image; endpoints need the serve image (dogbreed-serve, 'make push' records it): 'dogbreed deploy', or with the SageMaker Python SDK a Model/MultiDataModel with image_uri=<dogbreed-serve image> (README 'With the SageMaker Python SDK'), not estimator.deploy()" >&2
        exit 64
        ;;
esac
exec "$@"
