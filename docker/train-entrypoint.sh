#!/bin/sh
# Entry script of the train image, run under `tini -g` (PID 1, see Dockerfile.train).
#
# `train` (what SageMaker runs: `docker run <image> train`) goes to sagemaker-training's `train`,
# which runs $SAGEMAKER_PROGRAM. Any other command runs as given (`docker run <image> bash`).
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

if [ "${1:-}" = train ]; then
    fill_training_config
    trap '' TERM
fi
exec "$@"
