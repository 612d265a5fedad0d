"""Make the installed kedro-mlflow require mlflow-skinny instead of mlflow (docker/Dockerfile,
KVX_MLFLOW=skinny, runs it after `pip install --no-deps kedro-mlflow`).

kedro-mlflow declares `mlflow`, the full package (server, UI, SQLAlchemy, scikit-learn, scipy,
pandas, pyarrow...), while what it and kvx-runtime do in a step runs on mlflow-skinny. pip
resolves the requirements of an installed distribution again whenever a requirements file
names it: a project image's `pip install -r requirements.txt` listing kedro-mlflow would pull
full mlflow back in. With the installed metadata saying mlflow-skinny, which is installed,
kedro-mlflow stays satisfied. RECORD gets the new file's hash, so the installation stays
consistent (`pip check`, `pip uninstall`). Fails the build if the metadata is not as expected.
"""

import base64
import hashlib
import re
import sys
from importlib.metadata import distribution

dist = distribution("kedro-mlflow")
files = {str(file): file for file in dist.files or []}
info = next((name.rsplit("/", 1)[0] for name in files if name.endswith(".dist-info/METADATA")), None)
if info is None:
    sys.exit("kedro-mlflow-on-skinny: kedro-mlflow's METADATA is not in its RECORD")
metadata_path = files[f"{info}/METADATA"].locate()
record_path = files[f"{info}/RECORD"].locate()

text = metadata_path.read_text(encoding="utf-8")
# "mlflow" followed by a version specifier, a marker or nothing: not "mlflow-skinny" and the like.
text, count = re.subn(r"^Requires-Dist: mlflow(?=[\s<>=!~;(]|$)", "Requires-Dist: mlflow-skinny", text,
                      flags=re.MULTILINE)
if count != 1:
    sys.exit(f"kedro-mlflow-on-skinny: expected one requirement on mlflow in {metadata_path}, found {count}")
data = text.encode("utf-8")
metadata_path.write_bytes(data)

digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
lines = record_path.read_text(encoding="utf-8").splitlines()
entry = f"{info}/METADATA,"
lines = [f"{entry}sha256={digest},{len(data)}" if line.startswith(entry) else line for line in lines]
record_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
print(f"kedro-mlflow {dist.version} now requires mlflow-skinny")
