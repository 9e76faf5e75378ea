# Sourced by bench/gpu_serve.sh and bench/gpu_session.sh: the wheels bench/gpu_carry.sh put in .gpu_carry/whl
# (the server's packages and rocksdict/redis, which the GPU machine lacks) installed once into /tmp/site.
#   carry_site || exit 1; export PYTHONPATH=/tmp/site:.
carry_site() {
    [ -f /tmp/site/.turboserve-carry ] && return 0
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu_carry/whl/*.whl \
        && touch /tmp/site/.turboserve-carry
}
