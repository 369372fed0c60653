# Container images: build, push, run locally, test. Included by the top-level Makefile.
#
#   make docker-up                      engine + local base image on a Debian box like CI's
#   make build [BASE_IMAGE=...]         dogbreed-deps, dogbreed-train, dogbreed-serve : <sha>, latest
#   make push [REGISTRY=host:port]      to ECR (account/region from boto3), or any registry
#   make local-train / local-serve      docker run on the sample data / the trained model
#   make test-docker                    all of the above, checked (tests/docker)
PYTHON ?= .venv/bin/python
SAMPLE_DATA ?= ../shared/data/dogs-sample

# The docker.io 20.10 client has BuildKit built in; a newer client without buildx does not.
DOCKER ?= $(if $(wildcard /usr/bin/docker),/usr/bin/docker,docker)
BASE_IMAGE ?= python:3.11-slim-bookworm
LOCAL_BASE_IMAGE ?= local/debian:bookworm
DEPS_IMAGE ?= dogbreed-deps
# The images' torch: PyPI's newest build on CUDA 12 wheels (torch 2.10 -> CUDA 12.8, runs on
# driver >= 525.60.13; torch >= 2.11 on PyPI is CUDA 13, driver >= 580, which SageMaker's
# documented GPU hosts lack). Must lie inside pyproject.toml's torch range.
IMAGE_TORCH ?= torch==2.10.0 torchvision==0.25.0
# Each image's torch flavour: the pip index of its torch wheels (docker/Dockerfile.deps).
# Train: empty = PyPI's build (CUDA 12.8 for IMAGE_TORCH); e.g. .../whl/cu126 for CUDA 12.6.
# Serve: CPU (SageMaker multi-model endpoints with a custom container run on CPU instances);
# where that index is unreachable the build falls back to PyPI's build and says so.
TRAIN_TORCH_INDEX_URL ?=
SERVE_TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
# The serve image's own dependency image (the same image as DEPS_IMAGE when both flavours
# resolve to the same index).
SERVE_DEPS_IMAGE ?= $(DEPS_IMAGE)-serve
TRAIN_IMAGE ?= dogbreed-train
SERVE_IMAGE ?= dogbreed-serve
# Read once (and passed on to sub-makes), so a commit landing mid-run cannot split the tags.
ifndef GIT_SHA
GIT_SHA := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
endif
ifndef TAG
TAG := $(shell git rev-parse --short $(GIT_SHA) 2>/dev/null || echo dev)
endif
# Extra CA bundle for pip behind a TLS proxy: a BuildKit secret, never stored in an image.
CA_BUNDLE ?= $(firstword $(wildcard $(PIP_CERT) $(SSL_CERT_FILE) /etc/ssl/certs/ca-certificates.crt))
BAKE_IMAGENET_WEIGHTS ?= false
REGISTRY ?=
# What `make push` pushed (sha tag + digest): the launcher's default images (`dogbreed --pushed-images`).
PUSHED_IMAGES ?= .dogbreed/pushed-images.json
comma := ,

IMAGE_VERSION = $(shell python3 docker/pyproject_info.py version 2>/dev/null || echo unknown)
SOURCE_URL ?= $(or $(shell git config --get remote.origin.url 2>/dev/null),unknown)
DOCKER_BUILD = DOCKER_BUILDKIT=1 $(DOCKER) build --network host \
	$(if $(CA_BUNDLE),--secret id=cacert$(comma)src=$(CA_BUNDLE)) \
	--build-arg VERSION=$(IMAGE_VERSION) --build-arg GIT_SHA=$(GIT_SHA) --build-arg SOURCE_URL=$(SOURCE_URL)

# The CUDA labels (dogbreed.cuda.version, .min-driver, .compat; dogbreed/gpu.py), read from a
# dependency image: its torch flavour file and /usr/local/cuda/compat (present when BASE_IMAGE
# is an nvidia/cuda image). The package source is mounted; the deps image does not have it.
CUDA_LABELS = $(DOCKER) run --rm --network host -v $(CURDIR)/src:/opt/dogbreed-src:ro \
	-e PYTHONPATH=/opt/dogbreed-src --entrypoint python

# Local runs use the last build (`latest`).
RUN_TAG ?= latest
LOCAL_TRAIN_DIR ?= build/local-train
LOCAL_TRAIN_HPS ?= {"model": "resnet18", "epochs": "2", "batch-size": "16", "lr": "0.01", "image-size": "64", "weights": "none"}
# Mounted read-only at /opt/ml/models; each subfolder holding model.pt + model.json is a model.
LOCAL_MODELS ?= $(LOCAL_TRAIN_DIR)
SERVE_PORT ?= 8080
# --gpus all only where the NVIDIA runtime is there (docker/gpu-flags.sh).
DOCKER_RUN = $(DOCKER) run --rm --network host $$(sh docker/gpu-flags.sh $(DOCKER))

.PHONY: build push local-train local-serve test-docker docker-up

build: ## build the train and serve images (tags: git short sha and latest; BASE_IMAGE=...)
	@start=$$(date +%s); \
	$(DOCKER_BUILD) -f docker/Dockerfile.deps --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	  --build-arg TORCH_PINS="$(IMAGE_TORCH)" --build-arg TORCH_INDEX_URL=$(TRAIN_TORCH_INDEX_URL) \
	  -t $(DEPS_IMAGE):$(TAG) -t $(DEPS_IMAGE):latest . && \
	$(DOCKER_BUILD) -f docker/Dockerfile.deps --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	  --build-arg TORCH_PINS="$(IMAGE_TORCH)" --build-arg TORCH_INDEX_URL=$(SERVE_TORCH_INDEX_URL) \
	  -t $(SERVE_DEPS_IMAGE):$(TAG) -t $(SERVE_DEPS_IMAGE):latest . && \
	train_labels=$$($(CUDA_LABELS) $(DEPS_IMAGE):$(TAG) -m dogbreed.gpu labels) && \
	serve_labels=$$($(CUDA_LABELS) $(SERVE_DEPS_IMAGE):$(TAG) -m dogbreed.gpu labels) && \
	$(DOCKER_BUILD) -f Dockerfile.train --build-arg DEPS_IMAGE=$(DEPS_IMAGE):$(TAG) \
	  --build-arg BAKE_IMAGENET_WEIGHTS=$(BAKE_IMAGENET_WEIGHTS) $$train_labels \
	  -t $(TRAIN_IMAGE):$(TAG) -t $(TRAIN_IMAGE):latest . && \
	$(DOCKER_BUILD) -f Dockerfile.serve --build-arg DEPS_IMAGE=$(SERVE_DEPS_IMAGE):$(TAG) $$serve_labels \
	  -t $(SERVE_IMAGE):$(TAG) -t $(SERVE_IMAGE):latest . && \
	echo "built $(TRAIN_IMAGE):$(TAG) $(SERVE_IMAGE):$(TAG) in $$(( $$(date +%s) - start )) s" && \
	for image in $(TRAIN_IMAGE) $(SERVE_IMAGE); do \
	  echo "$$image torch flavour: $$($(DOCKER) run --rm --network host --entrypoint cat $$image:$(TAG) /opt/venv/torch-flavour)," \
	    "$$($(DOCKER) image inspect --format 'CUDA {{index .Config.Labels "dogbreed.cuda.version"}}, driver >= {{index .Config.Labels "dogbreed.cuda.min-driver"}}, compat libraries: {{index .Config.Labels "dogbreed.cuda.compat"}}' $$image:$(TAG))"; \
	done && \
	$(DOCKER) image ls --filter reference='$(TRAIN_IMAGE):$(TAG)' --filter reference='$(SERVE_IMAGE):$(TAG)'

push: ## push both images (tag and latest) to ECR, or to REGISTRY=host:port; record them in PUSHED_IMAGES
	$(PYTHON) scripts/push_images.py --docker $(DOCKER) --tag $(TAG) --record $(PUSHED_IMAGES) \
	  $(if $(REGISTRY),--registry $(REGISTRY)) train=$(TRAIN_IMAGE) serve=$(SERVE_IMAGE)

local-train: ## train in the train image on SAMPLE_DATA, output to build/local-train (GPU if present)
	rm -rf $(LOCAL_TRAIN_DIR) && mkdir -p $(LOCAL_TRAIN_DIR)/input/config
	printf '%s\n' '$(LOCAL_TRAIN_HPS)' > $(LOCAL_TRAIN_DIR)/input/config/hyperparameters.json
	$(DOCKER_RUN) $$([ "$$(id -u)" = 0 ] || echo --user $$(id -u):$$(id -g) -e HOME=/tmp) \
	  -v $(abspath $(LOCAL_TRAIN_DIR)):/opt/ml \
	  -v $(abspath $(SAMPLE_DATA)):/opt/ml/input/data/training:ro \
	  $(TRAIN_IMAGE):$(RUN_TAG) train
	@ls -l $(LOCAL_TRAIN_DIR)/model $(LOCAL_TRAIN_DIR)/output/data

local-serve: ## serve LOCAL_MODELS (default build/local-train) multi-model on 127.0.0.1:SERVE_PORT, in the foreground (Ctrl-C stops it)
	@echo "serving in the foreground: Ctrl-C stops it (from another shell: docker stop dogbreed-local-serve)"
	@echo "models under $(LOCAL_MODELS) are at /opt/ml/models/<folder>; e.g.:"
	@echo "  curl -X POST localhost:$(SERVE_PORT)/models -H 'Content-Type: application/json' -d '{\"model_name\": \"dogs\", \"url\": \"/opt/ml/models/model\"}'"
	@echo "  curl -X POST localhost:$(SERVE_PORT)/models/dogs/invoke -H 'Content-Type: image/jpeg' --data-binary @dog.jpg"
	$(DOCKER_RUN) --name dogbreed-local-serve \
	  -e SAGEMAKER_MULTI_MODEL=true -e SAGEMAKER_BIND_TO_PORT=$(SERVE_PORT) -e DOGBREED_BIND_HOST=127.0.0.1 \
	  -v $(abspath $(LOCAL_MODELS)):/opt/ml/models:ro \
	  $(SERVE_IMAGE):$(RUN_TAG) serve

docker-up: ## install and start a local Docker engine and base image (Debian, root; idempotent)
	BASE_IMAGE=$(LOCAL_BASE_IMAGE) scripts/docker-up.sh

test-docker: install docker-up ## build the images on the local base and run the docker tests
	$(MAKE) --no-print-directory build BASE_IMAGE=$(LOCAL_BASE_IMAGE) TAG=$(TAG) GIT_SHA=$(GIT_SHA)
	DOGBREED_DOCKER_TESTS=1 DOCKER=$(DOCKER) DOGBREED_IMAGE_TAG=$(TAG) \
	  DOGBREED_TRAIN_IMAGE=$(TRAIN_IMAGE):$(TAG) DOGBREED_SERVE_IMAGE=$(SERVE_IMAGE):$(TAG) \
	  DOGBREED_DEPS_IMAGE=$(DEPS_IMAGE):$(TAG) DOGBREED_SERVE_DEPS_IMAGE=$(SERVE_DEPS_IMAGE):$(TAG) \
	  $(PYTHON) -m pytest tests/docker tests/unit/test_push_images.py $(PYTEST_ARGS)
