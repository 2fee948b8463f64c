"""Print this process's detected topology as one JSON line (for tests under mpirun / torchrun)."""
import dataclasses
import json

from lmsdp.runtime.topology import detect_topology

topology = detect_topology()
print("TOPOLOGY " + json.dumps({**dataclasses.asdict(topology), "threads": topology.threads(),
                                "device": str(topology.device()), "num_nodes": topology.num_nodes}), flush=True)
