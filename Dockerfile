# The image the KubeRay manifests in k8s/ run: Ray's GPU image plus this project (GPU build).
FROM rayproject/ray:2.60.0-py311-gpu
WORKDIR /home/ray/lossaverse
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users cluster cluster
COPY --chown=ray:users pipeline pipeline
COPY --chown=ray:users training training
COPY --chown=ray:users serving serving
COPY --chown=ray:users configs configs
RUN pip install --no-cache-dir -e ".[gpu]"
USER ray
