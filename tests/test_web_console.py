"""The web console in a real browser (Debian's Chromium, driven by Playwright) against a real stack
under `ringfence up`: the embedded NATS with its nkey users, every service with operator_auth
required, an enforcer with real sessions, and the console with its own NATS credential.

One stack and one browser for the module; each test opens its own browser context. When a test
fails, a screenshot of every page it opened is written under its tmp dir."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ringfence.keyfiles import read_identity
from services.enforcer.uninstall import uninstall
from tests.support.nats import free_port
from tests.support.procs import ROOT, wait_for

pytestmark = pytest.mark.bpf

sync_api = pytest.importorskip("playwright.sync_api", reason="pip playwright (make test installs it)")
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (make test installs it: RINGFENCE_SETUP_TESTS=1)",
                allow_module_level=True)

RINGFENCE = [sys.executable, "-m", "ringfence.cli.main"]
# Playwright gives every launch a fresh profile (--user-data-dir) of its own.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
LOCKSMITH = """\
kind: role
version: v5
metadata:
  name: locksmith
spec:
  allow:
    rules:
    - resources: [lock]
      verbs: [list, create, read, update, delete]
"""
BAD_CIDR = """\
kind: network_restrictions
version: v4
metadata:
  name: network-restrictions
spec:
  allow:
  - cidr: 127.0.0.0/8
  - cidr: 10.0.0.0/33
"""


class Stack:
    def __init__(self, root: Path, nodename: str) -> None:
        self.root, self.nodename = root, nodename
        self.data, self.home, self.port = root / "data", root / "home", free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.home.mkdir()
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("RINGFENCE_")},
                    "HOME": str(self.home), "RINGFENCE_NODENAME": nodename}
        self.log = root / "up.log"
        self.up = subprocess.Popen([*RINGFENCE, "up", "--data-dir", str(self.data), "--nats-port", str(self.port),
                                    "--web-listen", "127.0.0.1:0"], cwd=ROOT, env=self.env,
                                   stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        self.sessions: list[subprocess.Popen] = []

    def cli(self, *args: str, identity: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        argv = [*RINGFENCE, *args, "--data-dir", str(self.data), "--nats-url", self.url]
        if identity:
            argv += ["--identity", str(identity)]
        out = subprocess.run(argv, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60)
        if check:
            assert out.returncode == 0, f"{args}: {out.stderr}\n{self.log.read_text()[-3000:]}"
        return out

    def wait_ready(self) -> str:
        def console() -> str | None:
            if self.up.poll() is not None:
                raise AssertionError(f"ringfence up exited:\n{self.log.read_text()[-5000:]}")
            found = re.search(r"web console at (http://\S+)", self.log.read_text())
            return found.group(1) if found and self.cli("status", "--wait", "0.5", check=False).returncode == 0 \
                else None

        try:
            return wait_for(console, timeout=90, interval=0.3, what="the stack and the web console under up")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log.read_text()[-5000:]}") from None

    def login_url(self, identity: Path | None = None) -> str:
        return self.cli("web", "login", identity=identity).stdout.strip()

    def session(self, script: str) -> subprocess.Popen:
        """An interactive (pty) session of user demo running `sh -c script` on the enforcer."""
        cmd = f"{' '.join(RINGFENCE)} run --data-dir {self.data} --user demo -- sh -c '{script}'"
        proc = subprocess.Popen(["script", "-qfec", cmd, "/dev/null"], cwd=ROOT, env=self.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.sessions.append(proc)
        return proc

    def active_sid(self, command_part: str) -> str:
        def find():
            found = json.loads(self.cli("sessions", "ls", "--format", "json").stdout)
            return next((s["sid"] for s in found if command_part in " ".join(s.get("command", []))), None)

        return wait_for(find, timeout=20, what=f"an active session running {command_part}")

    def events(self, **filters: str) -> list[dict]:
        args = [f"--{k}={v}" for k, v in filters.items()]
        out = self.cli("events", "search", "--since", "1h", "--format", "json", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def stop(self) -> None:
        for proc in self.sessions:
            if proc.poll() is None:
                proc.kill()
        self.up.terminate()
        try:
            self.up.wait(60)
        except subprocess.TimeoutExpired:
            self.up.kill()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    nodename = f"web{uuid.uuid4().hex[:8]}"
    root = tmp_path_factory.mktemp("web")
    for p in [root, *root.parents]:  # the session user (root here) reaches the socket; keep it simple
        if p == Path("/tmp") or not str(p).startswith("/tmp/"):
            break
        p.chmod(0o755)
    stack = Stack(root, nodename)
    try:
        stack.console = stack.wait_ready()
        stack.admin = stack.data / "admin.nk"
        yield stack
    finally:
        stack.stop()
        uninstall(nodename, kill_sessions=True)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser, request, tmp_path):
    """open_page(url, viewport) -> a page in a context of its own; screenshots of them all on failure."""
    pages = []
    failed_before = request.session.testsfailed

    def open_(url: str, viewport: dict = DESKTOP):
        context = browser.new_context(viewport=viewport)
        page = context.new_page()
        page.problems = []  # console errors and uncaught exceptions
        page.on("pageerror", lambda exc: page.problems.append(str(exc)))
        page.on("console", lambda msg: msg.type == "error" and page.problems.append(msg.text))
        pages.append(page)
        page.goto(url)
        return page

    yield open_
    failed = request.session.testsfailed > failed_before
    for n, page in enumerate(pages):
        if failed:
            with_hash = page.url.split("#", 1)[-1].strip("/").replace("/", "_") or "start"
            page.screenshot(path=str(tmp_path / f"page{n}-{with_hash[:60]}.png"), full_page=True)
        page.context.close()
    if failed:
        print(f"screenshots of the failed test's pages: {tmp_path}")


def signed_in(open_page, stack, identity: Path | None = None, viewport: dict = DESKTOP):
    page = open_page(stack.login_url(identity), viewport)
    user = read_identity(identity or stack.admin).user
    sync_api.expect(page.locator("#who")).to_have_text(f"signed in as {user}")
    return page


def go(page, stack, route: str) -> None:
    """Show the page afresh (the same address again reloads it)."""
    url = f"{stack.console}/#/{route}"
    if page.url == url:
        page.reload()
    else:
        page.goto(url)
    page.wait_for_selector("main .loading", state="detached")


def error_text(page) -> str:
    box = page.locator("main .error").first
    box.wait_for()
    return box.inner_text()


# --- tests ------------------------------------------------------------------------------------------------


def test_a_sign_in_url_works_once_and_every_page_fits_desktop_and_phone(stack, open_page):
    url = stack.login_url()
    page = open_page(url)
    sync_api.expect(page.locator("#who")).to_have_text("signed in as admin")
    again = open_page(url)  # another browser, the same link
    assert "already used or has expired" in again.locator("body").inner_text()
    assert again.locator("#who").count() == 0
    # Without a session the API refuses, with the way to sign in.
    reply = again.request.get(f"{stack.console}/api/locks")
    assert reply.status == 401 and "ringfence web login" in reply.json()["error"]

    # A change without the page's CSRF token is refused, with a session cookie or not.
    refused = page.request.post(f"{stack.console}/api/locks", data={"target": {"user": "x"}})
    assert refused.status == 403 and "X-CSRF-Token" in refused.json()["error"]

    phone = signed_in(open_page, stack, viewport=PHONE)
    for route, heading in [("events", "Audit events"), ("recordings", "Recordings"),
                           ("sessions", "Active sessions"), ("locks", "Locks"),
                           ("network", "Network restrictions"), ("users", "Users and roles")]:
        for p in (page, phone):
            go(p, stack, route)
            sync_api.expect(p.locator("h1")).to_have_text(heading)
            assert p.locator("main .error").count() == 0, p.locator("main .error").first.inner_text()
            width = p.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
            assert width[0] <= width[1], f"{route} is wider than the window: {width}"
    assert page.problems == [] and phone.problems == []
    # Keyboard: a link followed takes the focus to the new page's content; after a (re)load the first
    # Tab reaches the skip link, the next the first page link, and Enter follows it.
    go(page, stack, "locks")
    assert page.evaluate("document.activeElement.id") == "main"
    page.reload()
    page.wait_for_selector("main .loading", state="detached")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("h1")).to_have_text("Audit events")


def test_create_find_and_remove_a_lock_audited_as_the_operator(stack, open_page):
    follower = signed_in(open_page, stack)  # another operator's page, following events live
    go(follower, stack, "events")
    follower.get_by_role("button", name="Follow live").click()
    sync_api.expect(follower.locator("#live")).to_contain_text("Waiting for new events")
    page = signed_in(open_page, stack)
    go(page, stack, "locks")
    target = f"mallory-{uuid.uuid4().hex[:6]}"
    form = page.get_by_role("form", name="Create a lock")
    form.locator("input[name=lock-user]").fill(target)
    form.locator("input[name=message]").fill("Suspicious activity.")
    form.locator("input[name=ttl]").fill("1h")
    form.get_by_role("button", name="Create lock").click()
    sync_api.expect(page.locator("main .ok")).to_contain_text('Created a lock with name "')
    row = page.locator("tr", has_text=f"user={target}")
    sync_api.expect(row).to_contain_text("admin")  # created_by: the operator, not the console
    name = row.locator("td").first.inner_text()
    live_row = follower.locator("#live tbody tr:not(.detail)", has_text="lock.created").filter(has_text=target)
    sync_api.expect(live_row).to_contain_text("admin", timeout=10_000)

    go(page, stack, "events")
    page.fill("input[name=type]", "lock.created")
    page.fill("input[name=user]", "admin")
    event_row = page.locator("tbody tr", has_text="lock.created").filter(has_text=target).first

    def found() -> bool:  # the audit service indexes the event a moment after the lock is made
        page.get_by_role("button", name="Search").click()
        page.wait_for_selector("main .loading", state="detached")
        return event_row.count() > 0

    wait_for(found, timeout=15, interval=0.5, what="the lock.created event in the search")
    sync_api.expect(event_row).to_contain_text("admin")
    event_row.locator("button").click()
    detail = json.loads(page.locator("tr.detail:not([hidden]) pre").first.inner_text())
    assert detail["name"] == name and detail["target"] == {"user": target} and detail["user"] == "admin"

    go(page, stack, "locks")
    page.get_by_role("button", name=f"Remove lock {name}").click()
    sync_api.expect(page.locator("main .ok")).to_have_text(f'lock "{name}" has been deleted')
    sync_api.expect(page.locator("tr", has_text=target)).to_have_count(0)
    deleted = wait_for(lambda: [e for e in stack.events(type="lock.deleted") if e["name"] == name], timeout=15,
                       what="the lock.deleted event in the search")  # indexed a moment after the delete
    assert [e["user"] for e in deleted] == ["admin"]


def test_a_recording_plays_its_text_at_the_recorded_time(stack, open_page):
    stack.session("echo first-line; sleep 2; echo second-line").wait(30)

    def recorded():
        found = json.loads(stack.cli("sessions", "ls", "--ended", "--format", "json").stdout)
        return next((r for r in found if r.get("ended") and r["duration"] >= 2), None)

    rec = wait_for(recorded, timeout=30, what="the recording to be stored")
    page = signed_in(open_page, stack)
    go(page, stack, "recordings")
    page.get_by_role("link", name=rec["sid"]).click()
    screen = page.locator("#player pre.ap-term-text")
    page.wait_for_function("window.ringfencePlayer !== undefined")
    page.evaluate("window.ringfencePlayer.seek(1.0)")
    sync_api.expect(screen).to_contain_text("first-line")
    assert "second-line" not in screen.inner_text()  # at 1 s the second line is not written yet
    page.evaluate("window.ringfencePlayer.seek(2.5)")
    sync_api.expect(screen).to_contain_text("second-line")
    # Played at 4x from the start: the second line appears, and only once the player is past 2 s.
    page.select_option("select[name=speed]", "4")
    page.wait_for_selector('#player[data-speed="4"]')
    page.evaluate("window.ringfencePlayer.seek(0)")
    sync_api.expect(screen).not_to_contain_text("second-line")
    page.evaluate("window.ringfencePlayer.play()")
    sync_api.expect(screen).to_contain_text("second-line", timeout=10_000)
    assert page.evaluate("window.ringfencePlayer.getCurrentTime()") >= 1.9
    # The session's events beside it.
    sync_api.expect(page.locator(".events-timeline")).to_contain_text("session.start")
    sync_api.expect(page.locator(".events-timeline")).to_contain_text("session.end")
    assert page.problems == []


def test_join_a_live_session_see_its_output_and_kill_it(stack, open_page):
    proc = stack.session("i=0; while :; do i=$((i+1)); echo tick-$i; sleep 0.3; done")
    sid = stack.active_sid("tick-")
    page = signed_in(open_page, stack)
    go(page, stack, "sessions")
    row = page.locator("tr", has_text=sid)
    row.get_by_role("link", name="Join").click()
    sync_api.expect(page.locator("#terminal .xterm-rows")).to_contain_text("tick-", timeout=15_000)
    joins = wait_for(lambda: [e for e in stack.events(sid=sid) if e["event"] == "session.join"], timeout=20,
                     what="session.join")
    assert [e["user"] for e in joins] == ["admin"]  # the operator, as with `sessions join`

    go(page, stack, "sessions")
    page.once("dialog", lambda dialog: dialog.accept("ended from the console"))
    page.locator("tr", has_text=sid).get_by_role("button", name="Kill").click()
    sync_api.expect(page.locator("main .ok")).to_have_text(f'session "{sid}" has been terminated')
    proc.wait(20)
    assert "ended from the console" in proc.stdout.read().decode(errors="replace")


def test_a_bad_cidr_shows_the_same_error_as_create_f(stack, open_page):
    path = stack.root / "bad.yaml"
    path.write_text(BAD_CIDR)
    cli = stack.cli("create", "-f", str(path), check=False)
    assert cli.returncode == 1
    page = signed_in(open_page, stack)
    go(page, stack, "network")
    page.fill("textarea[name=yaml]", BAD_CIDR)
    page.get_by_role("button", name="Save").click()
    shown = error_text(page)
    assert f"ERROR: {shown}\n" == cli.stderr
    assert 'spec.allow[1].cidr: "10.0.0.0/33" is not a valid CIDR' in shown
    assert stack.cli("get", "network_restrictions").stdout == ""  # nothing changed


def test_an_operator_is_refused_what_their_role_does_not_allow(stack, open_page):
    role = stack.root / "locksmith.yaml"
    role.write_text(LOCKSMITH)
    stack.cli("create", "-f", str(role))
    alice = stack.root / "alice.nk"
    stack.cli("users", "add", "alice", "--roles", "locksmith", "--operator", "--out", str(alice))
    page = signed_in(open_page, stack, identity=alice)

    go(page, stack, "events")
    assert error_text(page) == 'access denied to perform action "list" on "event"'
    page.get_by_role("button", name="Follow live").click()  # the live tail asks the same
    sync_api.expect(page.locator("#live .error")).to_have_text('access denied to perform action "list" on "event"')
    go(page, stack, "network")
    assert error_text(page) == 'access denied to perform action "read" on "network_restrictions"'
    go(page, stack, "users")
    page.get_by_role("button", name="New role").click()
    page.fill("textarea[name=yaml]", LOCKSMITH.replace("locksmith", "escalated").replace("[lock]", "['*']"))
    page.get_by_role("button", name="Save").click()
    sync_api.expect(page.locator(".editor .error")).to_have_text('access denied to perform action "create" on "role"')
    # What the role allows works, as alice.
    go(page, stack, "locks")
    form = page.get_by_role("form", name="Create a lock")
    form.locator("input[name=lock-login]").fill("nobody")
    form.get_by_role("button", name="Create lock").click()
    sync_api.expect(page.locator("main .ok")).to_contain_text("Created a lock")
    sync_api.expect(page.locator("tr", has_text="login=nobody")).to_contain_text("alice")
    assert stack.cli("get", "roles/escalated", check=False).stdout == ""
    # A new identity for alice replaces her key: the console's grant from the old one stops working.
    stack.cli("users", "add", "alice", "--roles", "locksmith", "--operator", "--out", str(stack.root / "alice2.nk"))
    go(page, stack, "locks")
    assert 'is not the registered operator key of user "alice"' in error_text(page)
