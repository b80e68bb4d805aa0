"""End-to-end: the real metabridge binary on a node in a box (issue 2).

Pods are network namespaces calling http://169.254.169.254 through the rules
metabridge installs itself; the cluster is FakeKube. Every test builds and
removes its own node, pods and daemon (see tests/conftest.py).
"""

from __future__ import annotations

import concurrent.futures
import json
import shlex
import signal
import subprocess
import sys
import time

import pytest

from support import netns
from support.metabridge import WHOAMI_PATH, run_cli
from support.netns import nat_rules, nat_save, parse_rule, prerouting_jumps, wait_for
from support.testbed import METADATA_URL

GSA = "iam.gke.io/gcp-service-account"
ROLE = "eks.amazonaws.com/role-arn"


def assert_identity(result, pod, annotations=None):
    assert result.status == 200, f"{pod} was not identified: {result}"
    body = result.json()
    got = {k: body.get(k) for k in ("namespace", "pod", "uid", "serviceAccount")}
    want = {"namespace": pod.namespace, "pod": pod.kube_name, "uid": pod.uid,
            "serviceAccount": pod.service_account}
    assert got == want, f"whoami from {pod.ip} answered {body}"
    if annotations is not None:
        assert body.get("annotations") == annotations, body
    return body


def assert_refused(result, what):
    assert result.status is not None, f"{what}: no HTTP answer: {result}"
    assert result.status in (403, 404, 503), f"{what}: expected a refusal, got {result}"
    body = result.json()
    assert "pod" not in body and "serviceAccount" not in body, f"{what} was mapped: {body}"
    assert body.get("error"), f"{what}: refusal without a message: {body}"
    return body


def jump_lines(chain):
    return [line for line in nat_rules("PREROUTING")
            if line.startswith("-A ") and parse_rule(line).get("-j") == chain]


def dnat_rules(chain):
    return [parse_rule(line) for line in nat_rules(chain) if line.startswith("-A ")]


def assert_rules_in_place(node, mb):
    jumps = prerouting_jumps()
    assert jumps.count(node.chain) == 1, f"PREROUTING: {nat_rules('PREROUTING')}"
    # Our jump is the first rule; only other metabridge test nodes (parallel
    # runs on this machine) may also claim the top.
    before = jumps[:jumps.index(node.chain)]
    assert all(netns._CHAIN_RE.match(j) or j == "METABRIDGE" for j in before), \
        f"{node.chain} is not at the top of PREROUTING: {nat_rules('PREROUTING')}"
    jump = parse_rule(jump_lines(node.chain)[0])
    assert jump.get("-d") in (None, "169.254.169.254/32"), jump
    rules = dnat_rules(node.chain)
    assert len(rules) == 1, f"{node.chain}: {nat_rules(node.chain)}"
    rule = rules[0]
    assert rule["-j"] == "DNAT"
    assert rule["-i"] == node.interface_pattern
    assert rule["-d"] == "169.254.169.254/32"
    assert rule["-p"] == "tcp" and rule["--dport"] == "80"
    assert rule["--to-destination"] == mb.listen


def rules_in_place(node, mb):
    try:
        assert_rules_in_place(node, mb)
        return True
    except (AssertionError, IndexError, KeyError):
        return False


def jump_spec(chain):
    return shlex.split(jump_lines(chain)[0])[2:]


# -- identity ----------------------------------------------------------------


def test_two_pods_with_different_service_accounts_are_told_apart(testbed, metabridge):
    alice = testbed.add_pod("alice", "team-a", "reader",
                            {GSA: "reader@proj.iam.gserviceaccount.com"})
    bob = testbed.add_pod("bob", "team-b", "writer",
                          {ROLE: "arn:aws:iam::123456789012:role/writer"})
    # Same pod name as alice, other namespace, no annotations.
    alice_b = testbed.add_pod("alice", "team-b", "default")
    metabridge()

    for _ in range(2):
        assert_identity(testbed.whoami(alice), alice,
                        {GSA: "reader@proj.iam.gserviceaccount.com"})
        assert_identity(testbed.whoami(bob), bob,
                        {ROLE: "arn:aws:iam::123456789012:role/writer"})
        assert_identity(testbed.whoami(alice_b), alice_b, {})


def test_pod_registered_and_calling_at_once_is_identified(testbed, metabridge):
    mb = metabridge()
    for i in range(3):
        # add_pod registers in FakeKube as its last step; the call follows at once.
        pod = testbed.add_pod(f"fresh-{i}", "apps", f"sa-{i}")
        result = testbed.whoami(pod)
        assert_identity(result, pod)
        assert result.elapsed < 1.0, result
    wait_for(lambda: mb.metric("metabridge_pods_indexed") == 3, 5, message="3 pods indexed")


def test_pod_calling_before_the_watch_knows_it_is_identified(testbed, metabridge):
    """The pod calls in its first milliseconds, before the API server even has
    its IP; metabridge waits (within --pod-lookup-timeout) and answers."""
    mb = metabridge("--pod-lookup-timeout", "900ms")
    testbed.ensure_service_account("apps", "early-sa")
    pod = testbed.add_pod("early", "apps", "early-sa", register=False)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(testbed.whoami, pod)
        time.sleep(0.15)
        pod.uid = testbed.register_pod(pod, "early", "apps", "early-sa")
        result = pending.result(timeout=10)
    assert_identity(result, pod)
    assert result.elapsed < 1.0, result
    assert mb.metric_sum("metabridge_unknown_ip_lookups_total") >= 1


@pytest.mark.parametrize("old_state", ["deleted", "terminating", "succeeded"])
def test_reused_ip_maps_to_the_new_pod(testbed, metabridge, fake_kube, old_state):
    metabridge()
    old = testbed.add_pod("old", "apps", "old-sa", {ROLE: "arn:aws:iam::1:role/old"})
    assert_identity(testbed.whoami(old), old)

    ip = old.ip
    if old_state == "deleted":
        testbed.delete_pod(old)
    elif old_state == "terminating":  # still in the API, deletionTimestamp set
        fake_kube.mark_pod_deleting("apps", "old")
        testbed.delete_pod(old, kube=False)
    else:  # a finished Job pod keeps its status.podIPs
        fake_kube.update_pod("apps", "old", phase="Succeeded")
        testbed.delete_pod(old, kube=False)

    new = testbed.add_pod("new", "apps", "new-sa", {ROLE: "arn:aws:iam::1:role/new"}, ip=ip)
    assert new.ip == ip
    assert_identity(testbed.whoami(new), new, {ROLE: "arn:aws:iam::1:role/new"})


def test_two_live_pods_claiming_one_ip_are_refused(testbed, metabridge):
    mb = metabridge()
    pod = testbed.add_pod("first", "apps", "default")
    assert_identity(testbed.whoami(pod), pod)
    testbed.register_pod(pod, "impostor", "apps", "default")  # same IP, also Running
    wait_for(lambda: mb.metric("metabridge_pod_ip_conflicts") == 1, 5,
             message="the conflict to be noticed")
    body = assert_refused(testbed.whoami(pod), "a conflicting IP")
    assert pod.ip in body["error"], body


def test_host_network_pods_are_never_mapped(testbed, metabridge):
    host = testbed.add_host_network_pod("node-agent", "kube-system", "agent",
                                        {ROLE: "arn:aws:iam::1:role/node-agent"})
    # A pod that the API says is hostNetwork, even though it calls from a netns IP.
    odd = testbed.add_pod("odd", "kube-system", "agent", host_network=True)
    normal = testbed.add_pod("normal", "apps", "default")
    mb = metabridge()

    # The node IP, calling the listener directly from the root namespace.
    result = testbed.whoami(host, direct=mb)
    body = assert_refused(result, "the hostNetwork caller")
    assert result.elapsed < 1.0, result
    assert host.ip in body["error"], body

    assert_refused(testbed.whoami(odd), "a hostNetwork-flagged pod")
    assert_identity(testbed.whoami(normal), normal)  # the control


def test_unknown_caller_gets_a_clear_error_quickly(testbed, metabridge):
    metabridge()
    known = testbed.add_pod("known", "apps", "default")
    stranger = testbed.add_pod("stranger", register=False)
    result = testbed.whoami(stranger, timeout=5)
    body = assert_refused(result, "a caller with no pod")
    assert stranger.ip in body["error"], body
    assert result.elapsed < 1.0, f"refusal took {result.elapsed:.3f}s"
    assert_identity(testbed.whoami(known), known)


def test_service_account_annotation_changes_are_seen_within_a_second(testbed, metabridge):
    pod = testbed.add_pod("app", "apps", "runner", {GSA: "one@p.iam.gserviceaccount.com"})
    metabridge()
    assert_identity(testbed.whoami(pod), pod, {GSA: "one@p.iam.gserviceaccount.com"})

    for wanted in ({GSA: "two@p.iam.gserviceaccount.com", ROLE: "arn:aws:iam::1:role/two"},
                   {}):
        testbed.update_service_account("apps", "runner", wanted)
        start = time.monotonic()
        wait_for(lambda: testbed.whoami(pod).json().get("annotations") == wanted,
                 timeout=1.5, interval=0.05, message=f"annotations {wanted}")
        assert time.monotonic() - start < 1.5


def test_pods_added_after_watch_restarts_are_identified(testbed, metabridge, fake_kube):
    mb = metabridge()
    first = testbed.add_pod("first", "apps", "default")
    assert_identity(testbed.whoami(first), first)
    restarts_before = mb.metric_sum("metabridge_watch_restarts_total", resource="pods")
    api_before = mb.metric_sum("metabridge_unknown_ip_lookups_total", outcome="api")

    def added_through_watch(name, count):
        pod = testbed.add_pod(name, "apps", "default")
        # Known to the index before it calls: the watch delivered it.
        wait_for(lambda: mb.metric("metabridge_pods_indexed") == count, 10,
                 message=f"{name} to be indexed by the watch")
        assert_identity(testbed.whoami(pod), pod)

    fake_kube.close_watches()
    added_through_watch("after-close", 2)

    fake_kube.compact()          # every older resourceVersion is now 410 Gone
    fake_kube.close_watches()
    added_through_watch("after-compact", 3)

    testbed.update_service_account("apps", "default", {GSA: "late@p.iam.gserviceaccount.com"})
    wait_for(lambda: testbed.whoami(first).json().get("annotations")
             == {GSA: "late@p.iam.gserviceaccount.com"}, 5,
             message="service-account watch to resume")

    assert mb.metric_sum("metabridge_watch_restarts_total", resource="pods") >= restarts_before + 2
    assert mb.metric_sum("metabridge_unknown_ip_lookups_total", outcome="api") == api_before


# -- readiness -----------------------------------------------------------------


def test_readyz_is_503_until_the_api_server_is_reachable(testbed, fake_kube):
    pod = testbed.add_pod("app", "apps", "default")
    fake_kube.set_unavailable(True)
    mb = testbed.start_metabridge(wait=False)
    wait_for(lambda: mb.readyz() is not None, 15, message="the admin listener")
    for _ in range(15):
        assert mb.readyz() == 503
        assert mb.admin_get("/healthz")[0] == 200
        time.sleep(0.1)
    assert mb.metric("metabridge_ready") == 0

    fake_kube.set_unavailable(False)
    mb.wait_ready(20)
    wait_for(lambda: mb.metric("metabridge_ready") == 1, 2, message="metabridge_ready 1")
    assert_identity(testbed.whoami(pod), pod)


def test_readyz_is_503_while_the_api_server_is_unreachable(node, tmp_path, daemon_logs):
    """Nothing listens at the kubeconfig's address at first (connection refused)."""
    from support.fake_kube import FakeKube
    from support.metabridge import Metabridge, free_port
    from support.testbed import Testbed

    port = free_port()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "fake-admin-token"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    mb = Metabridge(node, kubeconfig, tmp_path)
    daemon_logs.append(mb)
    kube = tb = None
    try:
        mb.start()
        wait_for(lambda: mb.readyz() is not None, 15, message="the admin listener")
        for _ in range(15):
            assert mb.readyz() == 503
            time.sleep(0.1)

        kube = FakeKube(port=port).start()
        kube.add_node(node.name, addresses=[node.host_ip])
        tb = Testbed(kube, node, tmp_path / "tb")
        pod = tb.add_pod("app", "apps", "default")
        mb.wait_ready(30)
        assert_identity(tb.whoami(pod), pod)
    finally:
        mb.close()
        if tb is not None:
            tb.close()
        if kube is not None:
            kube.stop()


# -- interception rules ----------------------------------------------------------


def test_rules_are_installed_at_the_top_of_prerouting(testbed, metabridge, node):
    node.insert_decoy_prerouting_rule()  # kube-proxy-like rules already there
    pod = testbed.add_pod("app", "apps", "default")
    assert testbed.whoami(pod).status is None  # no rules yet: nothing answers
    mb = metabridge()
    assert_rules_in_place(node, mb)
    assert node.chain not in "\n".join(nat_rules("OUTPUT"))
    assert mb.metric("metabridge_iptables_rules_installed") >= 1
    assert_identity(testbed.whoami(pod), pod)


CLOUD_METADATA_SERVER = r"""
import http.server
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs use it
    def do_GET(self):
        body = b"the node's own metadata server"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("169.254.169.254", 80), Handler).serve_forever()
"""

KEEP_ALIVE_CLIENT = r"""
import http.client, json, sys
def fetch(conn):
    try:
        conn.request("GET", "/metabridge/v1/whoami")
        r = conn.getresponse()
        return [r.status, r.read().decode()]
    except Exception as e:
        return ["error", type(e).__name__]
kept = http.client.HTTPConnection("169.254.169.254", 80, timeout=5)
print(json.dumps(fetch(kept)), flush=True)
sys.stdin.readline()
print(json.dumps(fetch(kept)), flush=True)
print(json.dumps(fetch(http.client.HTTPConnection("169.254.169.254", 80, timeout=5))), flush=True)
"""


def test_connections_opened_before_the_rules_are_cut_when_they_are_installed(testbed, node):
    # A pod that reached the cloud's own metadata server before metabridge
    # (a new node, or a rolling update's gap) must not keep that keep-alive
    # connection: its conntrack entry would bypass the DNAT for good.
    cloud = node.add_cloud_metadata_pod()
    server = cloud.popen([sys.executable, "-c", CLOUD_METADATA_SERVER])
    pod = testbed.add_pod("app", "apps", "default")
    wait_for(lambda: testbed.whoami(pod, timeout=2).status == 200, timeout=10,
             message="the cloud metadata server answering")

    def keep_alive_client():
        client = pod.popen([sys.executable, "-c", KEEP_ALIVE_CLIENT],
                           stdin=subprocess.PIPE, text=True)
        return client, json.loads(client.stdout.readline())

    def go_on(client):
        client.stdin.write("go\n")
        client.stdin.flush()
        return json.loads(client.stdout.readline()), json.loads(client.stdout.readline())

    clients = [server]
    try:
        client, before = keep_alive_client()
        clients.append(client)
        assert before == [200, "the node's own metadata server"], before
        mb = testbed.start_metabridge("--iptables-resync", "1s")
        assert_rules_in_place(node, mb)
        kept, fresh = go_on(client)
        assert kept[0] == "error", \
            f"the connection opened before the rules still reaches the cloud: {kept}"
        assert fresh[0] == 200 and json.loads(fresh[1])["pod"] == "app", fresh

        # A repair forgets only flows that bypassed the rules: connections
        # already DNATed to metabridge survive it.
        client, before = keep_alive_client()
        clients.append(client)
        assert before[0] == 200 and json.loads(before[1])["pod"] == "app", before
        repairs = mb.metric_sum("metabridge_iptables_repairs_total")
        netns.iptables("-t", "nat", "-F", node.chain)
        wait_for(lambda: mb.metric_sum("metabridge_iptables_repairs_total") > repairs, 4,
                 message="a repair")
        wait_for(lambda: rules_in_place(node, mb), 4, message="rules back")
        kept, _ = go_on(client)
        assert kept[0] == 200 and json.loads(kept[1])["pod"] == "app", kept
    finally:
        for process in clients:
            process.kill()


def test_rules_are_repaired_after_outside_changes(testbed, metabridge, node):
    pod = testbed.add_pod("app", "apps", "default")
    mb = metabridge("--iptables-resync", "1s")
    assert_identity(testbed.whoami(pod), pod)

    def repairs():
        return mb.metric_sum("metabridge_iptables_repairs_total")

    breakages = {
        "flush the chain": [["-F", node.chain]],
        "delete the jump": [["-D", "PREROUTING", *jump_spec(node.chain)]],
        "delete the chain": [["-D", "PREROUTING", *jump_spec(node.chain)],
                             ["-F", node.chain], ["-X", node.chain]],
        "push the jump down": [["-I", "PREROUTING", "1", "-m", "comment", "--comment",
                                f"mb{node.id}-decoy"]],
    }
    for what, commands in breakages.items():
        before = repairs()
        for cmd in commands:
            netns.iptables("-t", "nat", *cmd)
        if what != "push the jump down":
            broken = testbed.whoami(pod, timeout=2)
            # Unless a resync raced in between, the pod is cut off now.
            assert broken.status is None or repairs() > before, (what, broken)
        wait_for(lambda: repairs() > before, 4, message=f"a repair after '{what}'")
        wait_for(lambda: rules_in_place(node, mb), 4, message=f"rules back after '{what}'")
        assert_identity(testbed.whoami(pod), pod)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_rules_are_removed_on_shutdown(testbed, metabridge, node, sig):
    pod = testbed.add_pod("app", "apps", "default")
    mb = metabridge()
    assert_identity(testbed.whoami(pod), pod)
    assert node.chain in nat_save()
    assert mb.stop(sig) == 0, mb.log_tail()
    assert node.chain not in nat_save()
    result = testbed.whoami(pod, timeout=2)
    assert result.status is None and result.elapsed < 1.0, result


def test_keep_rules_on_exit_fails_closed_through_a_restart(testbed, node):
    # The chart's removeOnStop=false: the rules outlive the process, pods get
    # "connection refused" (not the node's metadata server) until the next
    # instance listens on the same port, which finds the rules in place.
    pod = testbed.add_pod("app", "apps", "default")
    old = testbed.start_metabridge("--keep-rules-on-exit")
    assert_identity(testbed.whoami(pod), pod)
    assert old.stop(signal.SIGTERM) == 0, old.log_tail()
    assert_rules_in_place(node, old)
    refused = testbed.whoami(pod, timeout=2)
    assert refused.status is None and refused.curl_exit == 7, refused  # ECONNREFUSED

    new = testbed.start_metabridge("--keep-rules-on-exit", listen_port=old.listen_port)
    assert_identity(testbed.whoami(pod), pod)
    assert_rules_in_place(node, new)  # found in place, not duplicated
    assert run_cli(["iptables", "remove", "--iptables-chain", node.chain]).returncode == 0
    assert node.chain not in nat_save()


def test_iptables_remove_cleans_up_after_a_crash_and_is_idempotent(testbed, metabridge, node):
    mb = metabridge()
    assert mb.kill() == -signal.SIGKILL
    assert node.chain in nat_save(), "a SIGKILL cannot remove rules; test premise"
    for attempt in (1, 2):
        proc = mb.iptables_remove()
        assert proc.returncode == 0, (attempt, proc.stdout, proc.stderr)
        assert node.chain not in nat_save(), attempt


def test_restart_after_a_crash_repairs_instead_of_duplicating(testbed, node):
    pod = testbed.add_pod("app", "apps", "default")
    crashed = testbed.start_metabridge()
    assert crashed.kill() == -signal.SIGKILL
    stale = dnat_rules(node.chain)
    assert stale and stale[0]["--to-destination"] == crashed.listen

    fresh = testbed.start_metabridge()  # a new listen port: the old rule is stale
    assert fresh.listen != crashed.listen
    assert_rules_in_place(node, fresh)
    assert_identity(testbed.whoami(pod), pod)
    assert fresh.stop() == 0
    assert node.chain not in nat_save()


def test_the_node_itself_is_not_redirected(testbed, metabridge, node):
    pod = testbed.add_pod("app", "apps", "default")
    mb = metabridge()
    assert_identity(testbed.whoami(pod), pod)  # the rules work for pods
    before = mb.metric_sum("metabridge_requests_total")
    # From the root namespace with the node IP, as kubelet or a hostNetwork
    # pod would: not DNAT'd, so in the box it meets the unreachable route.
    result = node.host_caller().http_get(METADATA_URL + WHOAMI_PATH, timeout=3)
    assert result.status is None and result.elapsed < 1.0, result
    assert mb.metric_sum("metabridge_requests_total") == before
    assert not [line for line in nat_rules("OUTPUT") if node.chain in line]


# -- configuration -----------------------------------------------------------------

BASE = ["run", "--node-name", "n1"]


@pytest.mark.parametrize("args, bad", [
    (["run", "--listen", "127.0.0.1:8989"], "node-name"),
    (BASE + ["--listen", "nonsense"], "nonsense"),
    (BASE + ["--admin-listen", "1.2.3.4:99999"], "99999"),
    (BASE + ["--intercept-to", "nowhere"], "nowhere"),
    (BASE + ["--iptables-resync", "forever"], "forever"),
    (BASE + ["--pod-lookup-timeout", "soon"], "soon"),
    (BASE + ["--log-format", "xml"], "xml"),
    (BASE + ["--max-connections", "many"], "many"),
], ids=["no-node-name", "listen", "admin-listen", "intercept-to", "resync",
        "lookup-timeout", "log-format", "max-connections"])
def test_invalid_configuration_exits_with_one_line(args, bad):
    start = time.monotonic()
    proc = run_cli(args, env={"KUBECONFIG": "/nonexistent"}, timeout=20)
    assert proc.returncode != 0
    assert time.monotonic() - start < 10
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {proc.stderr!r}"
    assert bad.lower() in lines[0].lower(), lines[0]
    assert proc.stdout == ""


def test_invalid_configuration_from_the_environment_names_the_variable_value():
    proc = run_cli(["run"], env={"NODE_NAME": "n1", "METABRIDGE_LISTEN": "nonsense"})
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nonsense" in lines[0], proc.stderr
