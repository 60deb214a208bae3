//! The Debian package (`scripts/package.sh`), built around the test build's binary and
//! unpacked into a scratch root (`dpkg-deb -x`): everything where Debian expects it, the
//! generated pages and completions usable, the unit accepted by `systemd-analyze verify`.

use std::path::{Path, PathBuf};
use std::process::Command;

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn the_package_installs_binary_pages_completions_and_unit_where_debian_expects_them() {
    if !have("dpkg-deb") {
        assert_ne!(std::env::var("TUNBUS_REQUIRE_SYSTEM_TESTS").as_deref(), Ok("1"), "dpkg-deb is missing (apt-get install dpkg)");
        eprintln!("SKIPPED: no dpkg-deb");
        return;
    }
    let scratch = Scratch(std::env::temp_dir().join(format!("tunbus-package-{}", std::process::id())));
    let (out, root) = (scratch.0.join("out"), scratch.0.join("root"));
    let built = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/package.sh"))
        .args(["--binary", env!("CARGO_BIN_EXE_agent"), "--fast", "--out"])
        .arg(&out)
        .output()
        .expect("run package.sh");
    assert!(built.status.success(), "package.sh failed: {}", String::from_utf8_lossy(&built.stderr));
    let deb = PathBuf::from(String::from_utf8_lossy(&built.stdout).trim());
    assert!(deb.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("tunbus_") && n.ends_with(".deb")), "{deb:?}");
    let info = Command::new("dpkg-deb").args(["--field"]).arg(&deb).output().expect("dpkg-deb --field");
    let fields = String::from_utf8_lossy(&info.stdout);
    for field in ["Package: tunbus", "Depends: iproute2", "Section: net"] {
        assert!(fields.contains(field), "{field}:\n{fields}");
    }
    assert!(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root).status().expect("dpkg-deb -x").success());

    let at = |p: &str| root.join(p.trim_start_matches('/'));
    let bin = at("/usr/bin/agent");
    let version = Command::new(&bin).arg("--version").output().expect("run the packaged binary");
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("agent "), "{version:?}");
    assert_eq!(std::fs::read_link(at("/usr/bin/ioppytest-agent")).expect("the drop-in name"), Path::new("agent"));
    for page in ["agent", "agent-connect", "agent-peers", "agent-lab", "agent-route", "agent-provision", "agent-completions"] {
        let path = at(&format!("/usr/share/man/man1/{page}.1.gz"));
        let text = Command::new("gzip").arg("-dc").arg(&path).output().expect("gunzip");
        let roff = String::from_utf8_lossy(&text.stdout);
        assert!(text.status.success() && roff.contains(".TH") && roff.contains(page), "{page}: {}", &roff[..roff.len().min(300)]);
    }
    let connect = String::from_utf8_lossy(&Command::new("gzip").arg("-dc").arg(at("/usr/share/man/man1/agent-connect.1.gz")).output().expect("gunzip").stdout)
        .into_owned();
    assert!(connect.contains("max\\-batch\\-bytes") && connect.contains("TUNBUS_QUEUES"), "the connect page lacks its flags");
    let bash = at("/usr/share/bash-completion/completions/agent");
    let sourced =
        Command::new("bash").args(["--norc", "--noprofile", "-c"]).arg(format!("source {} && complete -p agent", bash.display())).output().expect("bash");
    assert!(sourced.status.success(), "{}", String::from_utf8_lossy(&sourced.stderr));
    for f in [
        "/usr/share/zsh/vendor-completions/_agent",
        "/usr/share/fish/vendor_completions.d/agent.fish",
        "/usr/share/doc/tunbus/examples/agent.example.toml",
        "/usr/share/doc/tunbus/copyright",
    ] {
        assert!(at(f).metadata().is_ok_and(|m| m.len() > 0), "{f} is missing or empty");
    }
    let unit = std::fs::read_to_string(at("/lib/systemd/system/tunbus-agent@.service")).expect("the unit");
    assert!(unit.contains("ExecStart=/usr/bin/agent connect --config /etc/tunbus/%i.toml") && unit.contains("Restart=on-failure"), "{unit}");
    if have("systemd-analyze") {
        // Verified with the binary where the scratch root has it, and no man lookups.
        let dir = scratch.0.join("units");
        std::fs::create_dir_all(&dir).expect("units folder");
        std::fs::write(dir.join("tunbus-agent@.service"), unit.replace("/usr/bin/agent", &bin.display().to_string())).expect("unit copy");
        let v = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(dir.join("tunbus-agent@h1.service")).output().expect("systemd-analyze");
        let said = String::from_utf8_lossy(&v.stderr);
        assert!(v.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
    }
}
