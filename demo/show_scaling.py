"""Read `adapterctl inspect --json` on stdin and print each module's rank, alpha and scaling."""

import json
import sys

doc = json.load(sys.stdin)
assert doc["schema_version"] == 1
for adapter in doc["adapters"]:
    for m in adapter["modules"]:
        print(
            f"{adapter['name']:8} {m['path']:34} r={m['r']} alpha={m['alpha']} "
            f"scaling={m['scaling']}"
        )
