"""Vendors the openAPIV3Schema of the custom resources the chart and its
examples use, from each operator's own CRD manifest, so that the tests can
validate rendered custom resources offline.

    python vendor.py <checkout of the operator's repository> ...

Each source below is (repository, path of the CRD in it, version); the
repository's commit is recorded in SOURCES.json beside the schemas. Only the
one served version's schema is kept, not the rest of the CRD.
"""

import json
import os
import subprocess
import sys

import yaml

SOURCES = [
    ("kedacore/keda", "config/crd/bases/keda.sh_scaledobjects.yaml", "v1alpha1"),
    ("strimzi/strimzi-kafka-operator", "packaging/install/cluster-operator/040-Crd-kafka.yaml", "v1"),
    ("strimzi/strimzi-kafka-operator", "packaging/install/cluster-operator/045-Crd-kafkanodepool.yaml", "v1"),
    ("strimzi/strimzi-kafka-operator", "packaging/install/cluster-operator/043-Crd-kafkatopic.yaml", "v1"),
    ("cloudnative-pg/cloudnative-pg", "config/crd/bases/postgresql.cnpg.io_clusters.yaml", "v1"),
    ("prometheus-operator/prometheus-operator",
     "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml", "v1"),
    ("prometheus-operator/prometheus-operator",
     "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml", "v1"),
]


def main(checkouts):
    here = os.path.dirname(os.path.abspath(__file__))
    by_repo = {}
    for checkout in checkouts:
        for repo, _, _ in SOURCES:
            if os.path.basename(os.path.normpath(checkout)).replace("+", "/") == repo or \
                    checkout.rstrip("/").endswith(repo.replace("/", "+") + "/repo"):
                by_repo[repo] = checkout
    provenance = {}
    for repo, path, version in SOURCES:
        checkout = by_repo.get(repo)
        if checkout is None:
            sys.exit(f"no checkout of {repo} given")
        commit = subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"],
                                check=True, capture_output=True, text=True).stdout.strip()
        text = subprocess.run(["git", "-C", checkout, "show", f"HEAD:{path}"],
                              check=True, capture_output=True, text=True).stdout
        crd = yaml.safe_load(text)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        [entry] = [v for v in crd["spec"]["versions"] if v["name"] == version]
        if not entry.get("served"):
            sys.exit(f"{kind} {version} is not served")
        name = f"{group}_{version}_{kind.lower()}.json"
        with open(os.path.join(here, name), "w") as out:
            json.dump(entry["schema"]["openAPIV3Schema"], out, indent=1, sort_keys=True)
            out.write("\n")
        provenance[name] = {"apiVersion": f"{group}/{version}", "kind": kind,
                            "repository": repo, "commit": commit, "path": path}
    with open(os.path.join(here, "SOURCES.json"), "w") as out:
        json.dump(provenance, out, indent=2, sort_keys=True)
        out.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
