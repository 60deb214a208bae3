//! The README's command blocks run as written, so that the README cannot drift again.
//!
//! Every ```sh block of README.md runs in bash (`set -euo pipefail`), with the `agent` this
//! test built first on `PATH`, unless the line before it says
//! `<!-- readme-test: skip: REASON -->` (blocks that need a platform's broker, or install
//! system-wide). Lines that start with a command of [`NOT_RUN`] are left out, each for its
//! reason. A line with `--keep` runs until it prints its "Ctrl-C" line, then gets SIGINT
//! (what the README tells a person to press) and must end with exit 0.
//!
//! Each block runs in a mount namespace of its own with fresh `/run/netns` and
//! `/run/tunbus`, so that its `ip netns add h1` and `agent status` meet nothing of this
//! machine's. `./scripts/demo.sh` runs the `agent` built here (`TUNBUS_AGENT`) instead of
//! building a release one. Blocks that share no names on the broker run side by side; the
//! ones that start labs (session `lab`) run one after another.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Commands of the README this test does not run, and why.
const NOT_RUN: [(&str, &str); 1] = [("./scripts/test.sh", "the whole test suite, which runs this test")];

/// How long one block may take.
const BLOCK_LIMIT: Duration = Duration::from_secs(300);

struct Block {
    /// Line of its fence in README.md.
    line: usize,
    text: String,
    skip: Option<String>,
}

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md")
}

/// The ```sh blocks of `text`, with their skip reasons.
fn blocks(text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() == "```sh" {
            let start = i;
            let skip = lines[..i]
                .iter()
                .rev()
                .find(|l| !l.trim().is_empty())
                .and_then(|l| l.trim().strip_prefix("<!-- readme-test: skip:"))
                .map(|r| r.trim_end_matches("-->").trim().to_owned());
            let mut body = Vec::new();
            i += 1;
            while i < lines.len() && lines[i].trim() != "```" {
                body.push(lines[i]);
                i += 1;
            }
            out.push(Block { line: start + 1, text: body.join("\n"), skip });
        }
        i += 1;
    }
    out
}

/// The bash script of a block: its lines, but those of [`NOT_RUN`], and `--keep` lines
/// through `keep`.
fn script(block: &Block) -> String {
    let mut s = String::from(
        r#"set -euo pipefail
# Whatever a failing line leaves running in the background is stopped (SIGTERM: goodbye,
# queues deleted) before the block ends.
trap 'status=$?; jobs -p | xargs -r kill 2>/dev/null || true; wait 2>/dev/null || true; exit $status' EXIT
keep() {
  "$@" > keep.out 2>&1 & local pid=$!
  for _ in $(seq 1 1200); do
    grep -q "Ctrl-C tears the lab down" keep.out && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if ! grep -q "Ctrl-C tears the lab down" keep.out; then cat keep.out >&2; echo "--keep never said how to stop it" >&2; return 1; fi
  kill -INT "$pid"; wait "$pid"
  grep -q "lab torn down" keep.out || { cat keep.out >&2; return 1; }
  echo "[keep: up, then Ctrl-C, torn down]"
}
"#,
    );
    for line in block.text.lines() {
        let command = line.trim_start();
        if NOT_RUN.iter().any(|(c, _)| command.starts_with(c)) {
            s.push_str(&format!("# not run: {command}\n"));
        } else if command.contains("--keep") {
            s.push_str(&format!("keep {command}\n"));
        } else {
            s.push_str(line);
            s.push('\n');
        }
    }
    s
}

/// Runs one block in a mount namespace of its own; its output on failure.
fn run_block(block: &Block, bin: &Path, work: &Path) -> Result<Duration, String> {
    std::fs::create_dir_all(work).map_err(|e| e.to_string())?;
    // demo.sh finds scripts/setup.sh from where it is.
    let scripts = work.join("scripts");
    if !scripts.exists() {
        std::os::unix::fs::symlink(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts"), &scripts).map_err(|e| e.to_string())?;
    }
    let file = work.join("block.sh");
    std::fs::write(&file, script(block)).map_err(|e| e.to_string())?;
    let inner =
        format!("mkdir -p /run/netns /run/tunbus && mount -t tmpfs tmpfs /run/netns && mount -t tmpfs tmpfs /run/tunbus && exec bash {}", file.display());
    let t0 = Instant::now();
    let mut child = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &inner])
        .current_dir(work)
        .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()))
        .env("TUNBUS_AGENT", bin.join("agent"))
        .env_remove("AMQP_URL")
        .env_remove("AMQP_URL_FILE")
        .env_remove("RUST_LOG")
        .stdout(std::fs::File::create(work.join("out.log")).map_err(|e| e.to_string())?)
        .stderr(std::fs::File::create(work.join("err.log")).map_err(|e| e.to_string())?)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("unshare: {e}"))?;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if t0.elapsed() > BLOCK_LIMIT {
            // The block's whole process group: its shell and what it started.
            // SAFETY: signalling the process group of a child we spawned as its leader.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGTERM);
            }
            std::thread::sleep(Duration::from_secs(3));
            let _ = child.kill();
            let _ = child.wait();
            break std::process::ExitStatus::default();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = t0.elapsed();
    let out = std::fs::read_to_string(work.join("out.log")).unwrap_or_default() + &std::fs::read_to_string(work.join("err.log")).unwrap_or_default();
    if status.success() {
        Ok(took)
    } else {
        Err(format!("README.md:{} failed ({status}, {took:.1?}):\n{}\n--- output\n{out}", block.line, block.text))
    }
}

/// The README's blocks, parsed: every one runs or says why not, and the commands left out
/// are still in it.
#[test]
fn every_block_runs_or_says_why_not() {
    let text = readme();
    let all = blocks(&text);
    assert!(all.len() >= 8, "README.md has {} sh blocks", all.len());
    for b in &all {
        if let Some(why) = &b.skip {
            assert!(why.len() > 10, "README.md:{}: a skipped block says why", b.line);
        }
    }
    for (command, why) in NOT_RUN {
        assert!(text.contains(command), "{command} ({why}) is no longer in the README: drop it from NOT_RUN");
    }
    let run = all.iter().filter(|b| b.skip.is_none()).count();
    assert!(run >= 5, "only {run} blocks run");
    let demo = all.iter().filter(|b| b.skip.is_none() && b.text.contains("./scripts/demo.sh")).count();
    assert!(demo >= 2, "the demo and its variants run");
}

#[test]
fn the_readme_commands_run() {
    if !system_ready("the_readme_commands_run") {
        return;
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_agent")).parent().expect("target dir").to_owned();
    let text = readme();
    let all: Vec<Block> = blocks(&text).into_iter().filter(|b| b.skip.is_none()).collect();
    // Labs share session `lab` (and the demo runs one): those one after another.
    let (labs, others): (Vec<&Block>, Vec<&Block>) = all.iter().partition(|b| b.text.contains("agent lab") || b.text.contains("demo.sh"));
    let root = std::env::temp_dir().join(unique("tunbus-readme-"));
    let t0 = Instant::now();
    let results = std::thread::scope(|s| {
        let mut handles = Vec::new();
        let labs_root = root.join("labs");
        let bin_ref = &bin;
        handles.push(s.spawn(move || labs.iter().map(|b| (b.line, run_block(b, bin_ref, &labs_root))).collect::<Vec<_>>()));
        for b in others {
            let work = root.join(format!("block{}", b.line));
            handles.push(s.spawn(move || vec![(b.line, run_block(b, bin_ref, &work))]));
        }
        handles.into_iter().flat_map(|h| h.join().expect("a block's thread")).collect::<Vec<_>>()
    });
    let mut failed = Vec::new();
    for (line, r) in &results {
        match r {
            Ok(took) => eprintln!("README.md:{line}: ok in {:.1} s", took.as_secs_f64()),
            Err(e) => failed.push(e.clone()),
        }
    }
    eprintln!("README: {} blocks in {:.1} s", results.len(), t0.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(&root);
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}
