#!/usr/bin/env bash
# Fetches the two photographs that scikit-learn's wheel ships (sklearn/datasets/images/china.jpg
# and flower.jpg, 640x427 JPEGs) for the ViT preprocessing tests (issue 14): downloads the
# scikit-learn 1.5.2 wheel for CPython 3.11 on manylinux x86-64 (pinned with --platform and
# --python-version, so the wheel and its sha256 are the same whatever interpreter runs pip)
# into a git-ignored cache, checks its sha256, and extracts only the two photos, checking
# theirs. Idempotent: verified photos are left alone; a verified wheel is not downloaded again.
# Files are written beside their final name and renamed after their check.
#
# Usage: scripts/fetch-sklearn-images.sh       prints the photo directory on its last line
#   SKLEARN_IMAGES_CACHE=DIR   cache folder (default <repo>/.cache/sklearn-images)
#   PYTHON=python3.11          interpreter whose pip downloads the wheel (default python3)
# The tests read the photos from TRANSFORMER_SKLEARN_IMAGES, by default
# <repo>/.cache/sklearn-images/images.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${SKLEARN_IMAGES_CACHE:-${repo_root}/.cache/sklearn-images}"
python_bin="${PYTHON:-python3}"
wheel="scikit_learn-1.5.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
wheel_sha256="f8b0ccd4a902836493e026c03256e8b206656f91fbcc4fde28c57a5b752561f1"
out="${cache}/images"

"${python_bin}" - "${cache}" "${wheel}" "${wheel_sha256}" <<'PY'
import hashlib, os, subprocess, sys, zipfile

cache, wheel, wheel_sha = sys.argv[1:4]
photos = {
    "china.jpg": "8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29",
    "flower.jpg": "a77f6ec41e353afdf8bdff2ea981b2955535d8d83294f8cfa49cf4e423dd5638",
}
out = os.path.join(cache, "images")

def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

if all(os.path.isfile(os.path.join(out, n)) and sha(os.path.join(out, n)) == s
       for n, s in photos.items()):
    print("scikit-learn photos already in place", file=sys.stderr)
    sys.exit(0)
os.makedirs(out, exist_ok=True)
wheel_path = os.path.join(cache, wheel)
if not os.path.isfile(wheel_path) or sha(wheel_path) != wheel_sha:
    if os.path.exists(wheel_path):
        os.remove(wheel_path)
    print(f"downloading scikit-learn==1.5.2 into {cache}", file=sys.stderr)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
         "--only-binary=:all:", "--platform", "manylinux2014_x86_64", "--python-version", "311",
         "--implementation", "cp", "--abi", "cp311", "scikit-learn==1.5.2", "-d", cache],
        check=True, stdout=sys.stderr)
actual = sha(wheel_path)
if actual != wheel_sha:
    sys.exit(f"error: {wheel_path}: sha256 {actual}, expected {wheel_sha}")
with zipfile.ZipFile(wheel_path) as z:
    for name, want in photos.items():
        data = z.read(f"sklearn/datasets/images/{name}")
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            sys.exit(f"error: {name} in {wheel_path}: sha256 {got}, expected {want}")
        tmp = os.path.join(out, f".{name}.tmp.{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(out, name))
print(f"extracted china.jpg and flower.jpg into {out}", file=sys.stderr)
PY
echo "${out}"
