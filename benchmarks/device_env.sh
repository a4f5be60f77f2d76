# Sourced by the device scripts: carried wheels (.whl/, e.g. gguf, deepspeed) go to /tmp/site, this checkout
# comes first on PYTHONPATH, output unbuffered, zinfer's cache (measured ceilings) in /tmp.
export PYTHONUNBUFFERED=1 ZINFER_CACHE=${ZINFER_CACHE:-/tmp/zinfer-cache}
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
