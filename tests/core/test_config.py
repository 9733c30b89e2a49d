"""Tests of the configuration schema: defaults, values, problems, overrides, the example."""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import textwrap

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dynproxy.core.config import (
    SETTINGS,
    Bind,
    CertificateEntry,
    Config,
    ConfigError,
    PluginSpec,
    UdpListener,
    apply_overrides,
    load_config,
    load_config_file,
    parse_bind,
    parse_duration,
    render_example,
)
from dynproxy.core.config_values import Invalid

REPO = pathlib.Path(__file__).resolve().parents[2]


def problems_of(text: str, source: str = "cfg.yaml") -> list:
    with pytest.raises(ConfigError) as caught:
        load_config(textwrap.dedent(text), source)
    return list(caught.value.problems)


def only_problem(text: str):
    found = problems_of(text)
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


# --- defaults ---------------------------------------------------------------------

@pytest.mark.parametrize("text", [None, "", "   \n", "# only a comment\n", "null\n", "---\n"])
def test_no_config_gives_the_defaults(text):
    assert load_config(text) == Config()


def test_default_values():
    cfg = Config()
    assert cfg.server.tcp_bind == (Bind("0.0.0.0", 8080),)
    assert cfg.server.udp_bind == (UdpListener(Bind("0.0.0.0", 8081), 60.0, 100000),)
    assert (cfg.server.buffer_size, cfg.server.max_connections, cfg.server.workers) == (
        262144, 10000, 0)
    assert (cfg.server.pid_file, cfg.server.backlog, cfg.server.udp_max_sessions) == (
        None, 1024, 100000)
    t = cfg.server.timeouts
    assert (t.connect, t.idle, t.client_hello, t.udp_session_idle) == (5.0, 300.0, 5.0, 60.0)
    assert cfg.shutdown.drain_timeout == 30.0
    assert (cfg.tls.cert_path, cfg.tls.key_path, cfg.tls.sni_routing, cfg.tls.strict_sni) == (
        None, None, True, False)
    assert (cfg.tls.min_version, cfg.tls.alpn, cfg.tls.handshake_timeout) == ("1.2", (), 10.0)
    assert (cfg.tls.allow_expired, cfg.tls.watch_interval, cfg.tls.certificates) == (
        False, 5.0, ())
    r = cfg.redis
    assert (r.url, r.pool_size, r.timeout_ms, r.cache_ttl_secs, r.max_retries) == (
        None, 10, 500, 30, 3)
    assert (r.key_prefix, r.rescan_interval, r.channel, r.close_removed) == (
        "proxy:", 2.0, "proxy:backends:changes", False)
    h = cfg.health
    assert (h.default_interval, h.default_timeout, h.default_rise, h.default_fall,
            h.passive_fall) == (2.0, 1.0, 2, 3, 3)
    m = cfg.monitoring
    assert (m.metrics_bind, m.log_level, m.enable_metrics, m.access_log, m.log_format) == (
        Bind("127.0.0.1", 9090), "info", True, True, "json")
    assert cfg.plugins == ()


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.timeouts.connect = 1.0  # type: ignore[misc]


# --- values -----------------------------------------------------------------------

FULL = """\
server:
  tcp_bind: ["[::1]:8443", ":9000", "LocalHost:80"]
  udp_bind:
    - "0.0.0.0:53"
    - bind: "127.0.0.1:5353"
      session_idle: 500ms
      max_sessions: 10
  buffer_size: 16384
  workers: 2
  pid_file: /run/dynproxy.pid
  timeouts: {connect: 1.5, idle: 2m, client_hello: "250ms", udp_session_idle: 1h}
  udp_max_sessions: 7
shutdown: {drain_timeout: 0}
tls:
  cert_path: certs/server.crt
  key_path: certs/server.key
  min_version: 1.3
  alpn: [h2, http/1.1]
  certificates:
    - hostname: API.Example.com.
      cert_path: certs/api.crt
      key_path: certs/api.key
    - {hostname: "*.example.com", name: wild, cert_path: w.crt, key_path: w.key}
    - {name: internal, cert_path: i.crt, key_path: i.key}
    - {hostname: bücher.example, cert_path: b.crt, key_path: b.key}
redis: {url: "rediss://:pw@redis.local:6380/2", key_prefix: "dp:", close_removed: yes}
monitoring: {metrics_bind: "[::]:9100", log_level: WARNING, log_format: text}
plugins:
  - {name: tenant_router, module: "my.routing:Tenant.route"}
"""


def test_a_full_config_is_read_into_typed_values():
    cfg = load_config(FULL, "full.yaml")
    assert cfg.server.tcp_bind == (Bind("::1", 8443), Bind("", 9000), Bind("localhost", 80))
    assert cfg.server.udp_bind == (UdpListener(Bind("0.0.0.0", 53), 3600.0, 7),
                                   UdpListener(Bind("127.0.0.1", 5353), 0.5, 10))
    assert (cfg.server.buffer_size, cfg.server.workers, cfg.server.pid_file) == (
        16384, 2, "/run/dynproxy.pid")
    assert cfg.server.timeouts.connect == 1.5 and cfg.server.timeouts.idle == 120.0
    assert cfg.server.timeouts.client_hello == 0.25
    assert cfg.shutdown.drain_timeout == 0.0
    assert cfg.tls.min_version == "1.3" and cfg.tls.alpn == ("h2", "http/1.1")
    assert cfg.tls.certificates == (
        CertificateEntry("certs/api.crt", "certs/api.key", "api.example.com"),
        CertificateEntry("w.crt", "w.key", "*.example.com", "wild"),
        CertificateEntry("i.crt", "i.key", None, "internal"),
        CertificateEntry("b.crt", "b.key", "xn--bcher-kva.example"),
    )
    assert cfg.redis.url == "rediss://:pw@redis.local:6380/2"
    assert cfg.redis.key_prefix == "dp:" and cfg.redis.close_removed is True
    assert cfg.monitoring.metrics_bind == Bind("::", 9100)
    assert cfg.monitoring.log_level == "warning" and cfg.monitoring.log_format == "text"
    assert cfg.plugins == (PluginSpec("tenant_router", "my.routing:Tenant.route"),)


def test_a_single_address_stands_for_a_list():
    cfg = load_config('server: {tcp_bind: "127.0.0.1:1", udp_bind: ":2"}')
    assert cfg.server.tcp_bind == (Bind("127.0.0.1", 1),)
    assert cfg.server.udp_bind[0].bind == Bind("", 2)


def test_empty_sections_and_empty_listener_lists():
    cfg = load_config("server:\n  udp_bind: []\ntls:\nredis: {}\n")
    assert cfg.server.udp_bind == () and cfg.tls == Config().tls


def test_yaml_merge_keys_are_applied():
    cfg = load_config("server:\n  timeouts:\n    <<: {connect: 2s, idle: 9}\n    idle: 10\n")
    assert cfg.server.timeouts.connect == 2.0 and cfg.server.timeouts.idle == 10.0


@pytest.mark.parametrize("text, bind", [
    ("0.0.0.0:8080", Bind("0.0.0.0", 8080)),
    (":8080", Bind("", 8080)),
    ("[::1]:443", Bind("::1", 443)),
    ("[::]:1", Bind("::", 1)),
    ("[2001:DB8::0001]:65535", Bind("2001:db8::1", 65535)),
    ("[fe80::1%eth0]:80", Bind("fe80::1%eth0", 80)),
    ("proxy.Example.com:80", Bind("proxy.example.com", 80)),
    (" localhost:5 ", Bind("localhost", 5)),
])
def test_bind_forms(text, bind):
    assert parse_bind(text) == bind


@pytest.mark.parametrize("text, reason", [
    ("8080", "no ':PORT'"),
    ("host:", "port ''"),
    ("host:0", "port '0'"),
    ("host:65536", "port '65536'"),
    ("host:http", "port 'http'"),
    ("host:-1", "port '-1'"),
    ("::1:8080", "IPv6 addresses go in brackets"),
    ("[::1]", "no ':PORT'"),
    ("[1.2.3.4]:80", "not an IPv6 address"),
    ("[::1:80", "IPv6 addresses go in brackets"),
    ("1.2.3.999:80", "not an IPv4 address"),
    ("bad_host!:80", "neither an IP address nor a hostname"),
    ("-lead.example:80", "neither an IP address nor a hostname"),
])
def test_bad_binds_say_why(text, reason):
    with pytest.raises(Invalid) as caught:
        parse_bind(text)
    assert reason in caught.value.reason


def test_ipv6_without_brackets_hints_the_fix():
    with pytest.raises(Invalid) as caught:
        parse_bind("::1:8080")
    assert caught.value.hint == "write '[::1]:8080'"


@pytest.mark.parametrize("value, seconds", [
    (5, 5.0), (0.25, 0.25), ("500ms", 0.5), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0),
    ("1.5s", 1.5), ("7", 7.0), (" 3 S ", 3.0), ("0", 0.0), (".5s", 0.5),
])
def test_duration_forms(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["5 sec", "s", "-1s", "1d", "", True, None, [1],
                                   float("inf"), float("nan"), -3, "1e3s", 10**400,
                                   "9" * 400])
def test_bad_durations(value):
    with pytest.raises(Invalid):
        parse_duration(value)


# --- problems: each kind of bad value -----------------------------------------------

BAD_VALUES = [
    # (yaml, dotted key, repr of the value shown, words of the expected form)
    ("server: {buffer_size: 12}", "server.buffer_size", "12", "integer from 1,024"),
    ("server: {buffer_size: 64k}", "server.buffer_size", "'64k'", "integer"),
    ("server: {max_connections: 0}", "server.max_connections", "0", "integer from 1"),
    ("server: {workers: true}", "server.workers", "True", "integer from 0 to 1,024"),
    ("server: {workers: 1.5}", "server.workers", "1.5", "integer"),
    ("server: {backlog: 70000}", "server.backlog", "70000", "1 to 65,535"),
    ("server: {pid_file: 3}", "server.pid_file", "3", "a file path, or null"),
    ("server: {tcp_bind: ['0.0.0.0:8080', 'x:0']}", "server.tcp_bind[1]", "'x:0'",
     "HOST:PORT"),
    ("server: {tcp_bind: {a: 1}}", "server.tcp_bind", "{'a': 1}", "HOST:PORT"),
    ("server: {udp_bind: [{bind: ':53', max_sessions: 0}]}", "server.udp_bind[0].max_sessions",
     "0", "integer from 1"),
    ("server: {udp_bind: [[1]]}", "server.udp_bind[0]", "[1]", "HOST:PORT"),
    ("server: {timeouts: {connect: 5 sec}}", "server.timeouts.connect", "'5 sec'",
     "duration"),
    ("server: {timeouts: {idle: 0}}", "server.timeouts.idle", "0", "more than zero"),
    ("server: {timeouts: 5}", "server.timeouts", "5", "mapping with keys connect"),
    ("server: [1]", "server", "[1]", "mapping with keys tcp_bind"),
    ("shutdown: {drain_timeout: -1}", "shutdown.drain_timeout", "-1", "zero or more"),
    ("tls: {sni_routing: 'yes please'}", "tls.sni_routing", "'yes please'", "true or false"),
    ("tls: {min_version: 1.1}", "tls.min_version", "1.1", "'1.2', '1.3'"),
    ("tls: {min_version: '1.4'}", "tls.min_version", "'1.4'", "'1.2', '1.3'"),
    ("tls: {min_version: true}", "tls.min_version", "True", "'1.2', '1.3'"),
    ("tls: {alpn: h2}", "tls.alpn", "'h2'", "a list"),
    ("tls: {alpn: ['']}", "tls.alpn[0]", "''", "ALPN protocol id"),
    ("tls: {cert_path: ''}", "tls.cert_path", "''", "a file path"),
    ("tls: {certificates: [{hostname: 'a.*.com', cert_path: c, key_path: k}]}",
     "tls.certificates[0].hostname", "'a.*.com'", "wildcard like '*.example.com'"),
    ("tls: {certificates: [{hostname: 'a..com', cert_path: c, key_path: k}]}",
     "tls.certificates[0].hostname", "'a..com'", "a host name"),
    ("tls: {certificates: [{name: '1st', cert_path: c, key_path: k}]}",
     "tls.certificates[0].name", "'1st'", "a name"),
    ("tls: {certificates: [x]}", "tls.certificates[0]", "'x'", "mapping with keys cert_path"),
    ("redis: {url: 'http://h:1'}", "redis.url", "'http://h:1'", "redis://"),
    ("redis: {url: 'redis://:6379'}", "redis.url", "'redis://:6379'", "redis://"),
    ("redis: {url: 'redis://h:99999'}", "redis.url", "'redis://h:99999'", "redis://"),
    ("redis: {url: 'redis://h/db1'}", "redis.url", "'redis://h/db1'", "redis://"),
    ("redis: {timeout_ms: 0}", "redis.timeout_ms", "0", "integer from 1"),
    ("redis: {key_prefix: ''}", "redis.key_prefix", "''", "non-empty string"),
    ("redis: {rescan_interval: fast}", "redis.rescan_interval", "'fast'", "duration"),
    ("health: {default_rise: 0}", "health.default_rise", "0", "integer from 1 to 100"),
    ("health: {passive_fall: -1}", "health.passive_fall", "-1", "integer from 0 to 100"),
    ("monitoring: {metrics_bind: 9090}", "monitoring.metrics_bind", "9090", "HOST:PORT"),
    ("monitoring: {log_level: verbose}", "monitoring.log_level", "'verbose'", "'debug'"),
    ("monitoring: {log_format: xml}", "monitoring.log_format", "'xml'", "'json', 'text'"),
    ("monitoring: {enable_metrics: 1}", "monitoring.enable_metrics", "1", "true or false"),
    ("plugins: {name: x}", "plugins", "{'name': 'x'}", "a list"),
    ("plugins: [{name: x, module: 'no colon'}]", "plugins[0].module", "'no colon'",
     "package.module:attribute"),
]


@pytest.mark.parametrize("text, key, shown, expected", BAD_VALUES)
def test_each_bad_value_is_reported_with_key_value_form_and_line(text, key, shown, expected):
    problem = only_problem(text)
    assert (problem.key, problem.value, problem.source, problem.line) == (key, shown,
                                                                           "cfg.yaml", 1)
    assert expected in problem.expected
    assert problem.what == "invalid value"
    assert str(problem).startswith(f"cfg.yaml:1:{problem.column}: {key}: invalid value {shown}")


def test_line_and_column_point_at_the_value():
    problem = only_problem("""\
        server:
          timeouts:
            connect: 5 sec
        """)
    assert (problem.line, problem.column) == (3, 14)


def test_every_problem_is_collected_in_file_order():
    found = problems_of("""\
        server:
          workers: -1
          timeouts:
            connect: soon
        tls:
          min_version: 1.0
        monitoring:
          log_level: inof
        """)
    assert [(p.key, p.line) for p in found] == [
        ("server.workers", 2), ("server.timeouts.connect", 4), ("tls.min_version", 6),
        ("monitoring.log_level", 8)]
    assert found[2].detail == "TLS 1.0 and 1.1 are insecure and never offered"
    assert found[3].hint == "did you mean 'info'?"


def test_the_error_message_lists_every_problem():
    with pytest.raises(ConfigError) as caught:
        load_config("server: {workers: x, backlog: y}", "a.yaml")
    message = str(caught.value)
    assert message.startswith("invalid configuration (2 problems):\n")
    assert "a.yaml:1:19: server.workers: invalid value 'x'; expected an integer" in message
    assert "a.yaml:1:31: server.backlog: invalid value 'y'" in message


def test_a_port_alone_hints_the_address_form():
    problem = only_problem("monitoring: {metrics_bind: 9090}")
    assert problem.hint == "write ':9090' for all addresses, or 'HOST:9090'"


def test_redis_password_is_masked_in_errors_and_display():
    problem = only_problem("redis: {url: 'http://user:hunter2@h:1'}")
    assert "hunter2" not in str(problem) and "user:***@h:1" in problem.value
    cfg = load_config("redis: {url: 'redis://:hunter2@h:1/0'}")
    assert cfg.to_dict()["redis"]["url"] == "redis://:***@h:1/0"
    assert cfg.to_dict(redact=False)["redis"]["url"] == "redis://:hunter2@h:1/0"


def test_huge_values_are_shown_bounded():
    problem = only_problem("server: {workers: '" + "x" * 10_000 + "'}")
    assert len(problem.value) < 100


# --- problems: keys ---------------------------------------------------------------

def test_unknown_key_with_did_you_mean_and_key_line():
    problem = only_problem("""\
        server:
          timeouts:
            conect: 5s
        """)
    assert (problem.key, problem.what, problem.line, problem.column) == (
        "server.timeouts.conect", "unknown key", 3, 5)
    assert problem.hint == "did you mean 'connect'?"
    assert "client_hello, connect, idle, udp_session_idle" in problem.expected


def test_unknown_section_with_did_you_mean():
    problem = only_problem("monitorin: {}")
    assert problem.key == "monitorin" and problem.hint == "did you mean 'monitoring'?"


def test_a_key_in_the_wrong_section_is_pointed_to_its_section():
    problem = only_problem("tcp_bind: ['0.0.0.0:1']")
    assert problem.hint == "'tcp_bind' belongs elsewhere: did you mean 'server.tcp_bind'?"


def test_a_key_far_from_any_name_gets_no_hint():
    problem = only_problem("zzzzzz: 1")
    assert problem.what == "unknown key" and problem.hint is None


def test_unknown_key_inside_a_list_item():
    problem = only_problem("""\
        tls:
          certificates:
            - cert_path: a
              key_path: b
              hostnme: x
        """)
    assert (problem.key, problem.line) == ("tls.certificates[0].hostnme", 5)
    assert problem.hint == "did you mean 'hostname'?"


def test_missing_required_key_points_at_its_mapping():
    problem = only_problem("""\
        plugins:
          - name: tenant
        """)
    assert (problem.key, problem.what, problem.line) == (
        "plugins[0].module", "missing required key", 2)


def test_duplicate_key():
    problem = only_problem("server:\n  workers: 1\n  workers: 2\n")
    assert (problem.key, problem.what, problem.line) == ("server.workers", "duplicate key", 3)
    assert problem.hint == "first given at line 2"


def test_non_string_key():
    problem = only_problem("server:\n  8080: x\n")
    assert problem.what == "invalid key 8080" and problem.line == 2


# --- problems: across settings --------------------------------------------------------

@pytest.mark.parametrize("text, key, what", [
    ("tls: {cert_path: a.crt}", "tls.cert_path", "is set but tls.key_path is not"),
    ("tls: {key_path: a.key}", "tls.key_path", "is set but tls.cert_path is not"),
    ("tls: {certificates: [{hostname: a.com, cert_path: a, key_path: a},"
     " {hostname: A.com, cert_path: b, key_path: b}]}",
     "tls.certificates[1].hostname", "duplicate hostname"),
    ("tls: {certificates: [{name: n, cert_path: a, key_path: a},"
     " {name: n, cert_path: b, key_path: b}]}", "tls.certificates[1].name", "duplicate name"),
    ("plugins: [{name: p, module: 'a:b'}, {name: p, module: 'c:d'}]", "plugins[1].name",
     "duplicate name"),
    ("plugins: [{name: redis_sni, module: 'a:b'}]", "plugins[0].name",
     "is the name of a built-in plugin"),
    ("server: {tcp_bind: [], udp_bind: []}", "server.tcp_bind", "no listeners at all"),
    ("server: {tcp_bind: [':80', '127.0.0.1:80']}", "server.tcp_bind[1]",
     "TCP address overlaps server.tcp_bind[0] (:80)"),
    ("server: {udp_bind: ['[::1]:53', {bind: '[::1]:53'}]}", "server.udp_bind[1].bind",
     "UDP address overlaps server.udp_bind[0].bind ([::1]:53)"),
    ("monitoring: {metrics_bind: '127.0.0.1:8080'}", "monitoring.metrics_bind",
     "TCP address overlaps server.tcp_bind[0] (0.0.0.0:8080)"),
])
def test_cross_setting_problems(text, key, what):
    problem = only_problem(text)
    assert (problem.key, problem.what, problem.line) == (key, what, 1)


def test_same_port_for_tcp_and_udp_or_unused_metrics_is_fine():
    cfg = load_config("server: {tcp_bind: [':53'], udp_bind: [':53']}\n"
                      "monitoring: {metrics_bind: ':53', enable_metrics: false}")
    assert cfg.server.tcp_bind[0].port == cfg.server.udp_bind[0].bind.port == 53


def test_cross_checks_stay_quiet_about_settings_already_reported():
    found = problems_of("server: {tcp_bind: ['bad'], udp_bind: []}\ntls: {cert_path: a}")
    assert [p.key for p in found] == ["server.tcp_bind[0]", "tls.cert_path"]


# --- problems: the document ----------------------------------------------------------

@pytest.mark.parametrize("text, shown", [("- a\n- b\n", "['a', 'b']"),
                                         ("just words\n", "'just words'"), ("42", "42")])
def test_a_document_that_is_not_a_mapping(text, shown):
    problem = only_problem(text)
    assert problem.what == "the config is not a mapping:" and problem.value == shown
    assert problem.line == 1 and "server, shutdown, tls" in problem.expected


@pytest.mark.parametrize("text, line", [
    ("server:\n  workers: 1\n   backlog: 2\n", 3),
    ("server: [\n", 2),
    ("server:\n\ttcp_bind: x\n", 2),
    ("a: 1\n---\nb: 2\n", 2),
    ("server:\n  workers: !custom 1\n", 2),
    ("server: &x\n  workers: *y\n", 2),
])
def test_invalid_yaml_is_a_clear_error_with_a_line(text, line):
    problem = only_problem(text)
    assert problem.what.startswith("invalid YAML") and problem.line == line
    assert problem.key == "" and str(problem).startswith(f"cfg.yaml:{line}:")


@pytest.mark.parametrize("text", ["server: {workers: !!int abc}", "server: {workers: !!int }",
                                  "server: {workers: !!timestamp 2020-99-99}"])
def test_a_tagged_value_yaml_cannot_read(text):
    problem = only_problem(text)
    assert (problem.key, problem.what, problem.line) == (
        "server.workers", "invalid YAML: unreadable value", 1)


def test_control_characters_are_reported_where_they_are():
    problem = only_problem("server:\n  pid_file: a\x07b\n")
    assert problem.what == "invalid YAML: character not allowed:"
    assert (problem.value, problem.line, problem.column) == ("'\\x07'", 2, 14)


def test_non_utf8_bytes_in_a_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"server:\n  pid_file: caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_config_file(path)
    (problem,) = caught.value.problems
    assert (problem.source, problem.line, problem.column) == (str(path), 2, 16)
    assert problem.value == "byte 0xe9" and problem.hint == "save the file as UTF-8"


def test_utf8_bytes_load():
    assert load_config("server: {pid_file: 'café'}".encode()).server.pid_file == "café"


def test_a_file_loads_and_names_itself(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("server: {workers: 3}\n")
    assert load_config_file(path).server.workers == 3
    path.write_text("server: {workers: x}\n")
    with pytest.raises(ConfigError) as caught:
        load_config_file(str(path))
    assert caught.value.problems[0].source == str(path)


def test_a_missing_file(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config_file(tmp_path / "nope.yaml")
    assert "cannot read the file" in caught.value.problems[0].what


def test_a_huge_file_is_refused(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_bytes(b"#" * (5 * 1024 * 1024))
    with pytest.raises(ConfigError) as caught:
        load_config_file(path)
    assert caught.value.problems[0].what == "file too large"


def test_an_alias_bomb_is_stopped():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    problem = only_problem("\n".join(lines))
    assert problem.what == "invalid YAML: too large or too deep"


def test_deep_nesting_is_stopped():
    problem = only_problem("server: " + "[" * 5000 + "]" * 5000)
    assert problem.what.startswith("invalid YAML")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("server:tcp_bind{}[]-'\"&*!# \n\t0123:.9sm")),
               max_size=80))
def test_no_text_crashes_the_loader(text):
    try:
        load_config(text)
    except ConfigError as error:
        assert error.problems


# --- overrides ----------------------------------------------------------------------

def test_overrides_from_command_line_strings():
    cfg = apply_overrides(Config(), {
        "server.tcp_bind": ("[::1]:8443", "127.0.0.1:8080"),
        "server.udp_bind": "[::1]:5353",
        "monitoring.metrics_bind": "127.0.0.1:9999",
        "server.workers": "2",
        "tls.sni_routing": "off",
        "server.pid-file": "none",
        "server.timeouts.connect": "250ms",
        "monitoring.log_level": "DEBUG",
    })
    assert cfg.server.tcp_bind == (Bind("::1", 8443), Bind("127.0.0.1", 8080))
    assert cfg.server.udp_bind == (UdpListener(Bind("::1", 5353), 60.0, 100000),)
    assert cfg.monitoring.metrics_bind == Bind("127.0.0.1", 9999)
    assert (cfg.server.workers, cfg.tls.sni_routing, cfg.server.pid_file) == (2, False, None)
    assert cfg.server.timeouts.connect == 0.25 and cfg.monitoring.log_level == "debug"


def test_overrides_keep_the_files_other_values_and_leave_the_original_alone():
    base = load_config("server: {workers: 3, tcp_bind: ':1'}\nredis: {pool_size: 4}")
    cfg = apply_overrides(base, {"server.tcp_bind": [":2"]})
    assert cfg.server.tcp_bind == (Bind("", 2),)
    assert (cfg.server.workers, cfg.redis.pool_size) == (3, 4)
    assert base.server.tcp_bind == (Bind("", 1),)


def test_overridden_server_wide_udp_settings_reach_listeners_that_inherit_them():
    base = load_config("server:\n  udp_bind: [':1', {bind: ':2', session_idle: 3}]\n")
    cfg = apply_overrides(base, {"server.timeouts.udp_session_idle": 9,
                                 "server.udp_max_sessions": "5"})
    assert [(u.session_idle, u.max_sessions) for u in cfg.server.udp_bind] == [(9.0, 5),
                                                                                (3.0, 5)]
    built = Config()  # no file behind it: the defaults still inherit
    assert apply_overrides(built, {"server.udp_max_sessions": 6}).server.udp_bind[0].max_sessions == 6


@pytest.mark.parametrize("key, value, text", [
    ("server.tcp_bind", ["[::1]:1", ":2"], "server: {tcp_bind: ['[::1]:1', ':2']}"),
    ("server.timeouts.idle", "2m", "server: {timeouts: {idle: 2m}}"),
    ("tls.certificates", [{"cert_path": "c", "key_path": "k", "name": "n"}],
     "tls: {certificates: [{cert_path: c, key_path: k, name: n}]}"),
    ("redis.url", "redis://h:1/3", "redis: {url: 'redis://h:1/3'}"),
    ("plugins", [{"name": "p", "module": "m:o"}], "plugins: [{name: p, module: 'm:o'}]"),
])
def test_an_override_equals_the_same_value_in_yaml(key, value, text):
    assert apply_overrides(Config(), {key: value}) == load_config(text)


def test_override_problems_name_the_command_line():
    with pytest.raises(ConfigError) as caught:
        apply_overrides(load_config("server: {workers: 1}", "f.yaml"),
                        {"server.tcp_bind": ["x:0"], "server.workers": "many"})
    found = caught.value.problems
    assert [(p.key, p.source, p.line, p.value) for p in found] == [
        ("server.tcp_bind[0]", "command line", None, "'x:0'"),
        ("server.workers", "command line", None, "'many'")]
    assert str(found[1]).startswith("command line: server.workers: invalid value 'many'")


def test_unknown_override_keys_and_sections():
    with pytest.raises(ConfigError) as caught:
        apply_overrides(Config(), {"server.tcp_bnd": ":1", "server.timeouts": 3, "nope": 1})
    found = caught.value.problems
    assert [(p.key, p.what) for p in found] == [
        ("server.tcp_bnd", "unknown setting"),
        ("server.timeouts", "is a section, not a setting"),
        ("nope", "unknown setting")]
    assert found[0].hint == "did you mean 'server.tcp_bind'?"
    assert found[1].expected == "a setting such as server.timeouts.connect"


def test_an_override_that_breaks_a_cross_check_is_reported():
    with pytest.raises(ConfigError) as caught:
        apply_overrides(Config(), {"monitoring.metrics_bind": ":8080"})
    (problem,) = caught.value.problems
    assert problem.key == "monitoring.metrics_bind" and problem.source == "command line"


def test_a_config_changed_in_code_is_overridden_from_its_own_values():
    changed = dataclasses.replace(load_config("server: {workers: 3}"),
                                  redis=load_config("redis: {pool_size: 7}").redis)
    cfg = apply_overrides(changed, {"server.backlog": 5})
    assert (cfg.server.workers, cfg.redis.pool_size, cfg.server.backlog) == (3, 7, 5)


# --- display and the example file ----------------------------------------------------

def test_to_dict_loads_back_to_the_same_config():
    cfg = load_config(FULL)
    again = load_config(yaml.safe_dump(cfg.to_dict(redact=False)))
    assert again == cfg
    assert cfg.to_dict()["server"]["tcp_bind"] == ["[::1]:8443", ":9000", "localhost:80"]
    assert cfg.to_dict()["server"]["timeouts"]["idle"] == 120.0


def test_the_committed_example_is_the_rendered_example():
    committed = (REPO / "config" / "dynproxy.yaml").read_text(encoding="utf-8")
    assert committed == render_example(), (
        "config/dynproxy.yaml is stale: python -m dynproxy.core.config > config/dynproxy.yaml")


def test_the_example_loads_to_the_defaults_and_shows_every_setting():
    text = render_example()
    assert load_config(text) == Config()
    for dotted_name, declared in SETTINGS.items():
        leaf = dotted_name.rsplit(".", 1)[-1]
        assert f"\n{'  ' * dotted_name.count('.')}{leaf}: " in text or (
            f"\n{'  ' * dotted_name.count('.')}{leaf}:\n" in text), dotted_name
        assert declared.help and declared.kind.expected


def test_the_documented_examples_are_valid_settings():
    with_examples = {name: d.example for name, d in SETTINGS.items() if d.example is not None}
    assert {"server.udp_bind", "tls.certificates", "plugins"} <= set(with_examples)
    for name, example in with_examples.items():
        tree: object = example
        for part in reversed(name.split(".")):
            tree = {part: tree}
        load_config(yaml.safe_dump(tree))
        assert f"#   {name.rsplit('.', 1)[-1]}:" in render_example()


# --- purity --------------------------------------------------------------------------

CONFIG_MODULES = ["config", "config_checks", "config_example", "config_fields",
                  "config_problems", "config_schema", "config_values", "config_yaml"]


@pytest.mark.parametrize("module", CONFIG_MODULES)
def test_config_modules_import_no_io_libraries(module):
    source = (REPO / "dynproxy" / "core" / f"{module}.py").read_text()
    tree = ast.parse(source)
    assert ast.get_docstring(tree), f"{module} needs a docstring saying what it is for"
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"gevent", "socket", "ssl", "redis", "select", "subprocess"}


def test_an_empty_config_file_is_refused(tmp_path):
    # `--config FILE` names a file on purpose: empty means truncated, not "defaults please"
    path = tmp_path / "dynproxy.yaml"
    path.write_text("\n  \n")
    with pytest.raises(ConfigError, match="the file is empty"):
        load_config_file(path)
    path.write_text("# everything at its default\n{}\n")
    assert load_config_file(path) == load_config(None)
