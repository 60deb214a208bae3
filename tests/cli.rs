//! The command line as a shell user meets it: completion scripts that a real bash sources and
//! completes with, the `ioppytest-agent` name, and the log flags.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{system_ready, unique, URL};

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_agent")).args(args).output().expect("run agent")
}

/// What bash's completion offers for `line` (ending in the word being completed).
fn bash_completes(script: &str, line: &str) -> Vec<String> {
    let words: Vec<&str> = line.split(' ').collect();
    let program = format!(
        "source {script}\nCOMP_WORDS=({words})\nCOMP_CWORD={cword}\nCOMP_LINE='{line}'\nCOMP_POINT={point}\n_agent agent '{cur}' '{prev}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        words = words.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(" "),
        cword = words.len() - 1,
        point = line.len(),
        cur = words[words.len() - 1],
        prev = words[words.len() - 2],
    );
    let out = Command::new("bash").args(["--norc", "--noprofile", "-c", &program]).output().expect("run bash");
    assert!(out.status.success(), "bash failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).filter(|l| !l.is_empty()).collect()
}

#[test]
fn bash_sources_the_completions_and_completes_subcommands_and_flags() {
    let out = agent(&["completions", "bash"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let script = std::env::temp_dir().join(format!("tunbus-completions-{}.bash", std::process::id()));
    std::fs::write(&script, &out.stdout).expect("write the script");
    let path = script.to_str().expect("utf-8 path");
    let sourced = Command::new("bash").args(["--norc", "--noprofile", "-c", &format!("set -e; source {path}; complete -p agent")]).output().expect("run bash");
    assert!(sourced.status.success() && sourced.stderr.is_empty(), "sourcing failed: {}", String::from_utf8_lossy(&sourced.stderr));
    assert_eq!(bash_completes(path, "agent con"), ["connect"]);
    assert_eq!(bash_completes(path, "agent pro"), ["provision"]);
    assert!(bash_completes(path, "agent connect --que").contains(&"--queues".to_owned()));
    assert!(bash_completes(path, "agent lab --bro").contains(&"--brokers".to_owned()));
    let _ = std::fs::remove_file(&script);
}

#[test]
fn every_shell_gets_a_script_and_a_wrong_one_a_usage_error() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = agent(&["completions", shell]);
        assert!(out.status.success() && out.stdout.len() > 1000, "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("connect"), "{shell}");
    }
    let out = agent(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values"));
}

#[test]
fn the_ioppytest_agent_name_and_its_flags_are_understood() {
    let dir = std::env::temp_dir().join(format!("tunbus-dropin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("folder");
    let program = dir.join("ioppytest-agent");
    let _ = std::fs::remove_file(&program);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_agent"), &program).expect("symlink");
    // A name without the old defaults shows that connect now speaks the old wire: only it
    // needs addresses given (or the agent_1 … agent_6 defaults).
    let out = Command::new(&program).args(["connect", "--url", "amqp://127.0.0.1:1", "--name", "iut", "--force-bootstrap", "--dump"]).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a flag error found after clap is bad usage: {err}");
    assert!(err.contains("has no default addresses"), "{err}");
    assert!(!err.contains("unexpected argument"), "--dump and --force-bootstrap are accepted: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `agent route` on the machine's broker for a moment: what it wrote to stderr. It logs
/// "router serving" at info once it is up; `until` ends the wait early.
fn router_stderr(extra: &[&str], until: Option<&str>) -> String {
    let dir = std::env::temp_dir();
    let tag = unique("clirt");
    let topology = dir.join(format!("{tag}.yaml"));
    std::fs::write(&topology, "topology:\n  - link_id: l\n    nodes: [a, b]\n").expect("topology");
    let log = dir.join(format!("{tag}.log"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["route", "--url", URL, "--exchange", &unique("tunbus.x"), "--stats-interval", "0", "--topology"])
        .arg(&topology)
        .args(extra)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn the router");
    let t0 = Instant::now();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    while t0.elapsed() < Duration::from_secs(3) && !until.is_some_and(|u| read().contains(u)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = read();
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&topology);
    text
}

#[test]
fn log_lines_can_be_json_or_quiet() {
    if !system_ready("log_lines_can_be_json_or_quiet") {
        return;
    }
    let text = router_stderr(&[], Some("router serving"));
    assert!(text.contains(" INFO ") && text.contains("router serving"), "{text}");
    let json = router_stderr(&["--log-format", "json"], Some("router serving"));
    let line = json.lines().find(|l| l.contains("router serving")).unwrap_or_else(|| panic!("no serving line: {json}"));
    let v: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
    assert_eq!((v["level"].as_str(), v["fields"]["message"].as_str()), (Some("INFO"), Some("router serving")), "{line}");
    // Quiet: the same 3 s of a router, no info line.
    let quiet = router_stderr(&["--quiet"], None);
    assert!(!quiet.contains("INFO") && !quiet.contains("router serving"), "{quiet}");
    assert_eq!(agent(&["connect", "--log-format", "xml"]).status.code(), Some(2));
}

/// `agent connect` with `env` and a `--config` file holding `file`: its stderr and exit code.
fn connect_with(file: &str, args: &[&str], env: &[(&str, &str)]) -> (String, Option<i32>) {
    let path = std::env::temp_dir().join(format!("{}.toml", unique("tunbus-config")));
    std::fs::write(&path, file).expect("write the file");
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["connect", "--url", "amqp://127.0.0.1:1", "--config"])
        .arg(&path)
        .args(args)
        .envs(env.iter().copied())
        .env_remove("AMQP_URL")
        .output()
        .expect("run agent");
    let _ = std::fs::remove_file(&path);
    (String::from_utf8_lossy(&out.stderr).into_owned(), out.status.code())
}

/// Precedence flag > environment > file > default, seen through which out-of-range value
/// the parser refuses (each source gives a different one).
#[test]
fn config_file_precedence_and_errors() {
    let file = "name = \"h1\"\n# the queues\nqueues = 19\n";
    let (err, code) = connect_with(file, &[], &[]);
    assert!(err.contains(":3: key `queues`: invalid value '19'"), "{err}");
    assert_eq!(code, Some(2));
    let (err, _) = connect_with(file, &[], &[("TUNBUS_QUEUES", "17")]);
    assert!(err.contains("invalid value '17'") && !err.contains("--config"), "{err}");
    let (err, _) = connect_with(file, &["--queues", "18"], &[("TUNBUS_QUEUES", "17")]);
    assert!(err.contains("invalid value '18'"), "{err}");
    // Valid values from the file: the agent gets as far as the broker (unreachable: 3).
    let (err, code) = connect_with("name = \"h1\"\nqueues = 2\nno-offload = true\nipv4 = [\"198.18.0.1/24\"]\n", &[], &[]);
    assert_eq!(code, Some(3), "{err}");
    // A key that is no flag, a table, bad TOML, a file that is not there.
    let (err, code) = connect_with("name = \"h1\"\nqueus = 2\n", &[], &[]);
    assert!(err.contains(":2: key `queus`: not a flag"), "{err}");
    assert_eq!(code, Some(2));
    let (err, code) = connect_with("[agent]\nname = \"h1\"\n", &[], &[]);
    assert!(err.contains(":1: key `agent`: is a table"), "{err}");
    assert_eq!(code, Some(2));
    let (err, code) = connect_with("name = \"h1\n", &[], &[]);
    assert!(err.contains(":1: "), "{err}");
    assert_eq!(code, Some(2));
    // The example in docs/ is read as it stands: every key is a flag with a valid value (its
    // tls-ca then meets this plain URL).
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/agent.example.toml");
    let out = agent(&["connect", "--url", "amqp://127.0.0.1:1", "--config", example]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("--config") && err.contains("--tls-* flags need an amqps:// URL"), "{err}");
    let out = agent(&["connect", "--name", "h1", "--config", "/nonexistent/tunbus.toml"]);
    assert_eq!(out.status.code(), Some(9), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Every flag of `connect` has an environment variable, shown in `--help`.
#[test]
fn every_connect_flag_has_an_environment_variable() {
    let help = String::from_utf8(agent(&["connect", "--help"]).stdout).expect("utf-8 help");
    let mut entries: Vec<String> = Vec::new();
    for line in help.lines() {
        let t = line.trim_start();
        let starts_entry = line.starts_with("  ") && !line.starts_with("          ") && t.starts_with('-');
        match entries.last_mut() {
            Some(e) if !starts_entry => e.push_str(line),
            // From the long flag on (`-q, --quiet Log …`: the help text may hold ", " too).
            _ if starts_entry => entries.push(t.split_whitespace().skip_while(|w| !w.starts_with("--")).collect::<Vec<_>>().join(" ")),
            _ => {}
        }
    }
    let mut flags = 0;
    for entry in &entries {
        let flag = entry.split([' ', '=']).next().unwrap_or_default();
        if matches!(flag, "--url" | "--url-file" | "--help" | "--version" | "--quiet" | "--log-format") {
            continue;
        }
        flags += 1;
        let var = format!("TUNBUS_{}", flag.trim_start_matches("--").to_uppercase().replace('-', "_"));
        assert!(entry.contains(&format!("[env: {var}=")), "{flag} has no {var}:\n{entry}");
    }
    assert!(flags > 30, "{flags} flags:\n{help}");
    assert_eq!(
        Command::new(env!("CARGO_BIN_EXE_agent"))
            .args(["connect", "--url", "amqp://127.0.0.1:1"])
            .env("TUNBUS_NAME", "h1")
            .env("TUNBUS_QUEUES", "0")
            .output()
            .expect("run")
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn a_wrong_emulation_or_capture_flag_says_what_is_wrong() {
    for (args, says) in [
        (&["connect", "--name", "h1", "--emulate", "delay fast"][..], "delay TIME: expected a time (20ms, 1.5ms, 500us, 2s), found \"fast\""),
        (&["connect", "--name", "h1", "--emulate", "jitter 1ms"][..], "unknown word \"jitter\""),
        (&["connect", "--name", "h1", "--emulate-to", "h2"][..], "expected PEER=SPEC"),
        (&["connect", "--name", "h1", "--emulate-to", "h2=loss 120%"][..], "loss PERCENT: expected a percentage from 0% to 100% (1%, 0.5%), found \"120%\""),
        (&["capture", "-w", "x.pcapng", "--duration", "soon"][..], "is not a duration"),
        (&["capture", "-w", "x.pcapng", "--address", "h2"][..], "is not an IP address"),
        (&["capture"][..], "--write <FILE>"),
    ] {
        let out = agent(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let help = String::from_utf8_lossy(&agent(&["connect", "--help"]).stdout).into_owned();
    for flag in ["--emulate <SPEC>", "--emulate-to <PEER=SPEC>", "--emulate-seed <N>", "--pcap <FILE>"] {
        assert!(help.contains(flag), "connect --help lists {flag}");
    }
    let help = String::from_utf8_lossy(&agent(&["capture", "--help"]).stdout).into_owned();
    assert!(help.contains("--agent <NAME>") && help.contains("--no-segment") && help.contains("topic read"), "{help}");
}
