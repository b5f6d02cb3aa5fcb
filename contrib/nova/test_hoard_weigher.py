#!/usr/bin/python3
"""Test HoardWeigher with Nova's own weigher handler against a real hoard.

Run with Debian's python3-nova (Zed) on /usr/bin/python3:

    HOARD_API_URL=http://127.0.0.1:7480 HOARD_API_TOKEN=... \\
    /usr/bin/python3 contrib/nova/test_hoard_weigher.py IMAGE_ID HOLDER HOST...

checks that Nova's HostWeightHandler, with HoardWeigher alone and with all of
Nova's weighers, ranks HOLDER first among the hosts; that an aggregate's
hoard_weight_multiplier of 0 takes the preference away; and, with
HOARD_API_URL pointing at a closed port, that every weight is equal and no
exception escapes. It exits 0 when all checks pass and prints one line per check.
"""

import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from nova import objects  # noqa: E402

objects.register_all()

from nova.scheduler import weights  # noqa: E402
from nova.tests.unit.scheduler import fakes  # noqa: E402

from hoard_nova import weigher as hoard  # noqa: E402


def spec(image_id):
    return objects.RequestSpec(image=objects.ImageMeta(id=image_id, properties=objects.ImageMetaProps()),
                               flavor=objects.Flavor(vcpus=1, memory_mb=512, root_gb=1, ephemeral_gb=0, swap=0),
                               num_instances=1, ignore_hosts=[], force_hosts=[], force_nodes=[],
                               instance_group=None, pci_requests=objects.InstancePCIRequests(requests=[]),
                               scheduler_hints={}, requested_destination=None, project_id="demo", user_id="demo")


def host_states(names, multiplier=None):
    hosts = []
    for n in names:
        attrs = {"free_ram_mb": 4096, "free_disk_mb": 100000, "vcpus_total": 8, "vcpus_used": 0,
                 "num_instances": 0, "num_io_ops": 0, "cpu_allocation_ratio": 1.0,
                 "ram_allocation_ratio": 1.0, "disk_allocation_ratio": 1.0,
                 "total_usable_ram_mb": 4096, "total_usable_disk_gb": 100,
                 "aggregates": []}
        if multiplier is not None:
            attrs["aggregates"] = [objects.Aggregate(id=1, name="agg", metadata={"hoard_weight_multiplier": str(multiplier)})]
        hosts.append(fakes.FakeHostState(n, n, attrs))
    return hosts


failed = []


def check(ok, what):
    print(("PASS " if ok else "FAIL ") + what)
    if not ok:
        failed.append(what)


def ranking(classes, hosts, request):
    handler = weights.HostWeightHandler()
    weighers = handler.get_matching_classes(classes)
    return [(w.obj.host, round(w.weight, 4)) for w in
            handler.get_weighed_objects([cls() for cls in weighers], hosts, request)]


def main():
    image_id, holder, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    if not os.environ.get("HOARD_API_URL"):
        sys.exit("set HOARD_API_URL")
    hw = "hoard_nova.weigher.HoardWeigher"

    got = ranking([hw], host_states(names), spec(image_id))
    print("hoard alone:", got)
    check(got[0][0] == holder and got[0][1] > got[-1][1], "HoardWeigher alone ranks %s first" % holder)

    got = ranking(["nova.scheduler.weights.all_weighers", hw], host_states(names), spec(image_id))
    print("all weighers + hoard:", got)
    check(got[0][0] == holder, "with all of Nova's weighers, %s still ranks first" % holder)

    got = ranking([hw], host_states(names, multiplier=0), spec(image_id))
    print("aggregate multiplier 0:", got)
    check(len({w for _, w in got}) == 1, "an aggregate's hoard_weight_multiplier=0 weighs every host the same")

    # hoard unreachable: a port nobody listens on.
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    os.environ["HOARD_API_URL"] = "http://127.0.0.1:%d" % port
    start = time.monotonic()
    try:
        got = ranking([hw], host_states(names), spec(image_id))
        print("hoard unreachable:", got, "in %.3f s" % (time.monotonic() - start))
        check(len({w for _, w in got}) == 1, "with hoard unreachable every weight is equal")
        got = ranking([hw], host_states(names), spec(image_id))
        check(len({w for _, w in got}) == 1, "and again (logged once)")
    except Exception as exc:  # the check: nothing escapes
        check(False, "with hoard unreachable an exception escaped: %r" % exc)

    # A blackhole: a listener that never answers, bounded by [hoard] timeout.
    bh = socket.socket()
    bh.bind(("127.0.0.1", 0))
    bh.listen(1)
    os.environ["HOARD_API_URL"] = "http://127.0.0.1:%d" % bh.getsockname()[1]
    start = time.monotonic()
    try:
        got = ranking([hw], host_states(names), spec(image_id))
        took = time.monotonic() - start
        print("hoard silent:", got, "in %.3f s" % took)
        check(len({w for _, w in got}) == 1 and took < 5, "with hoard silent every weight is equal, within the timeout")
    except Exception as exc:
        check(False, "with hoard silent an exception escaped: %r" % exc)
    bh.close()

    # No image in the request (a volume-backed boot): equal weights.
    noimg = spec(image_id)
    noimg.image = objects.ImageMeta(properties=objects.ImageMetaProps())
    got = ranking([hw], host_states(names), noimg)
    check(len({w for _, w in got}) == 1, "a request without an image weighs every host the same")

    print("FAILED: %d" % len(failed) if failed else "OK")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
