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
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("has no default addresses"), "{err}");
    assert!(err.contains("--dump: tunbus has no per-agent capture yet"), "{err}");
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
