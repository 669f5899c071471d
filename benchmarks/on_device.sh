#!/usr/bin/env bash
# The GPU checks on a lent device machine (README, "On a GPU"). Run from the repository root,
# with the data of `embseg gpu-check prepare --data .gpucheck` and the wheels in .whl/ carried:
#   bash benchmarks/on_device.sh OUT check [ARGS]   # embseg gpu-check run (both parts)
#   bash benchmarks/on_device.sh OUT bench [ARGS]   # embseg bench --gpu-sizes --parts memory,loss,search
# ARGS go to that command (e.g. `--parts memory`; a later option of the same name wins).
set -uo pipefail
out=$1
part=$2
shift 2
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/embseg-site .whl/*.whl || exit
    export PYTHONPATH="/tmp/embseg-site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
mkdir -p "$out"
{   # the machine, for the record (DataLoader workers pass batches through /dev/shm)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    nproc; free -g; df -h /dev/shm
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} >"$out/machine.txt" 2>&1
case $part in
    check) python3 -m embseg gpu-check run --data .gpucheck --out "$out/check" "$@" ;;
    bench) python3 -m embseg bench --gpu-sizes --parts memory,loss,search --out "$out/bench" "$@" ;;
    *) echo "on_device.sh: unknown part '$part' (check or bench)" >&2; exit 2 ;;
esac
