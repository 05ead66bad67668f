#!/usr/bin/env bash
# The main job on a fresh machine: install, make a scene, find the objects its expressions describe with the embedded
# default model, and draw the results. Output: artifacts/demo/{scene.png,refer.png,caption.png}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
out=artifacts/demo
mkdir -p "$out"
python - "$out" <<'PY'
import json, sys
from pixelllm_plugins.data.formats import demo_scene
image, expressions = demo_scene(7)
image.save(f"{sys.argv[1]}/scene.png")
json.dump(expressions, open(f"{sys.argv[1]}/expressions.json", "w"))
print("scene:", f"{sys.argv[1]}/scene.png", "objects:", "; ".join(expressions))
PY
mapfile -t exprs < <(python -c "import json;print('\n'.join(json.load(open('$out/expressions.json'))))")
pixelllm refer "$out/scene.png" "${exprs[@]}" --json --draw "$out/refer.png"  # every expression of the scene
pixelllm segment "$out/scene.png" "${exprs[@]}" --draw "$out/masks.png"          # a mask for each
pixelllm caption "$out/scene.png" --trace --draw "$out/caption.png"
echo "pictures: $out/refer.png $out/masks.png $out/caption.png"
