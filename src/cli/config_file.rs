//! `agent connect --config FILE`: a TOML file of `connect`'s flags, under their long names.
//!
//! ```toml
//! name = "h1"
//! url = ["amqps://h1@node1:5671/lab", "amqps://h1@node2:5671/lab"]
//! queues = 4
//! ipv4 = "198.18.0.1/24"
//! no-offload-from-bus = true
//! ```
//!
//! Precedence is flag > environment > file > default: a key becomes `--key=value` only when
//! neither the command line nor the environment gave that flag. So the file goes through the
//! same parser as the flags, with the same checks; a key that is no flag, or a value of the
//! wrong kind, is an error naming the file, the line and the key.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};

use super::{command, Cli, ParseError};
use crate::exit::{Exit, Failure};

/// Parses `argv` (as [`super::effective_args`] gave it): flags, then the environment, then
/// the `--config` file, then the defaults. A value from the file that the parser refuses is
/// reported with the file's line and key.
pub(super) fn parse_with_file(argv: &[OsString]) -> Result<Cli, ParseError> {
    use clap::FromArgMatches;
    // A first, lenient look for `connect --config` and for what the flags and the
    // environment already set (the file may hold required flags, like the name).
    let lenient = command()
        .ignore_errors(true)
        .mut_subcommand("connect", |c| c.ignore_errors(true))
        .mut_subcommand("doctor", |c| c.ignore_errors(true))
        .try_get_matches_from(argv);
    let file = match lenient.as_ref().ok().and_then(|m| m.subcommand()) {
        Some((sub @ ("connect" | "doctor"), given)) => match given.get_one::<PathBuf>("config") {
            Some(path) => Some((path.clone(), file_args(sub, path, given)?)),
            None => None,
        },
        _ => None,
    };
    let Some((path, (text, table, extra))) = file else {
        return command().try_get_matches_from(argv).and_then(|m| Cli::from_arg_matches(&m)).map_err(ParseError::Clap);
    };
    match command().try_get_matches_from(argv.iter().chain(&extra)).and_then(|m| Cli::from_arg_matches(&m)) {
        Ok(cli) => Ok(cli),
        Err(e) => {
            // A value from the file that the parser refuses: name its line and key.
            let arg = match e.get(clap::error::ContextKind::InvalidArg) {
                Some(clap::error::ContextValue::String(a)) => a.clone(),
                _ => String::new(),
            };
            let long = arg.trim_start_matches("--").split([' ', '=']).next().unwrap_or_default().to_owned();
            let Some(key) = table.keys().find(|k| {
                !long.is_empty() && k.replace('_', "-") == long && extra.iter().any(|x| x.to_str().is_some_and(|x| x.starts_with(&format!("--{long}"))))
            }) else {
                return Err(ParseError::Clap(e));
            };
            let text_of_error = e.to_string();
            let why = text_of_error.lines().next().unwrap_or_default().trim_start_matches("error: ").to_owned();
            let err = FileError { line: line_of(&text, key), key: Some(key.clone()), why };
            Err(ParseError::File(Failure::new(Exit::Usage, format!("--config {}", err.describe(&path.display().to_string())))))
        }
    }
}

/// The `--config` file of subcommand `sub` (connect, or doctor, which checks connect's
/// start): its text, its table, and its keys as arguments.
fn file_args(sub: &str, path: &std::path::Path, given: &clap::ArgMatches) -> Result<(String, toml::Table, Vec<OsString>), ParseError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ParseError::File(Failure::new(Exit::Local, format!("cannot read --config {file}: {e}"))))?;
    let bad = |e: FileError| ParseError::File(Failure::new(Exit::Usage, format!("--config {}", e.describe(&file))));
    let table = parse(&text).map_err(bad)?;
    let cmd = command();
    let connect = cmd.find_subcommand(sub).ok_or_else(|| ParseError::File(Failure::new(Exit::Internal, format!("no {sub} command"))))?;
    // The URL is one setting, whether given as `url` or `url-file`: the command line's
    // --url or --url-file, then the URL's variables, outrank both keys of the file.
    let url_in_env = std::env::var_os("AMQP_URL").is_some() || std::env::var_os("AMQP_URL_FILE").is_some();
    let url_on_command_line = ["url", "url_file"].iter().any(|id| matches!(given.value_source(id), Some(ValueSource::CommandLine)));
    let mut all = Vec::new();
    for (key, value) in &table {
        if (url_in_env || url_on_command_line) && matches!(key.replace('_', "-").as_str(), "url" | "url-file") {
            continue;
        }
        all.extend(key_args(&text, connect, given, key, value).map_err(bad)?);
    }
    Ok((text, table, all))
}

/// Where in the file, and what is wrong.
#[derive(Debug, PartialEq, Eq)]
pub struct FileError {
    pub line: usize,
    pub key: Option<String>,
    pub why: String,
}

impl FileError {
    /// One line: `FILE:LINE: key `K`: why`.
    pub fn describe(&self, file: &str) -> String {
        match &self.key {
            Some(k) => format!("{file}:{}: key `{k}`: {}", self.line, self.why),
            None => format!("{file}:{}: {}", self.line, self.why),
        }
    }
}

/// The line (1-based) on which `key` is set in `text`, else 1.
pub fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            let l = l.strip_prefix('"').and_then(|r| r.strip_prefix(key)).and_then(|r| r.strip_prefix('"')).or_else(|| l.strip_prefix(key));
            l.is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map_or(1, |i| i + 1)
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Datetime(_) | toml::Value::Array(_) | toml::Value::Table(_) => None,
    }
}

/// One key of the file as `--long=value` arguments (for `connect`, whose definition is
/// `command`), or nothing when the command line or the environment already set that flag.
pub fn key_args(text: &str, command: &Command, given: &ArgMatches, key: &str, value: &toml::Value) -> Result<Vec<OsString>, FileError> {
    let err = |why: String| FileError { line: line_of(text, key), key: Some(key.to_owned()), why };
    let long = key.replace('_', "-");
    let Some(arg) = command.get_arguments().find(|a| a.get_long() == Some(long.as_str()) && long != "config" && !a.is_hide_set()) else {
        return Err(err("not a flag of `agent connect` (keys are its long flag names, like queues or max-batch-bytes)".into()));
    };
    if matches!(given.value_source(arg.get_id().as_str()), Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
        return Ok(Vec::new()); // flag > environment > file
    }
    let flag = |v: String| OsString::from(format!("--{long}={v}"));
    match (arg.get_action(), value) {
        (ArgAction::SetTrue, toml::Value::Boolean(true)) => Ok(vec![OsString::from(format!("--{long}"))]),
        (ArgAction::SetTrue, toml::Value::Boolean(false)) => Ok(Vec::new()),
        (ArgAction::SetTrue, _) => Err(err("is a switch: write true or false".into())),
        (ArgAction::Append, toml::Value::Array(items)) => {
            items.iter().map(|i| scalar(i).map(flag).ok_or_else(|| err("list items must be strings or numbers".into()))).collect()
        }
        (_, toml::Value::Array(_)) => Err(err("takes one value, not a list".into())),
        (_, v) => scalar(v).map(|s| vec![flag(s)]).ok_or_else(|| err("must be a string, a number or a boolean".into())),
    }
}

/// The file's TOML as a table of top-level keys.
pub fn parse(text: &str) -> Result<toml::Table, FileError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(1, |s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        FileError { line, key: None, why: e.message().to_owned() }
    })?;
    if let Some((key, _)) = table.iter().find(|(_, v)| v.is_table()) {
        return Err(FileError { line: line_of(text, key), key: Some(key.clone()), why: "is a table: the file holds connect's flags as top-level keys".into() });
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn connect() -> Command {
        Command::new("connect")
            .arg(Arg::new("queues").long("queues").default_value("1"))
            .arg(Arg::new("url").long("url").action(ArgAction::Append))
            .arg(Arg::new("no_offload").long("no-offload").action(ArgAction::SetTrue))
            .arg(Arg::new("config").long("config"))
    }

    fn args(text: &str, cmdline: &[&str]) -> Result<Vec<String>, FileError> {
        let cmd = connect();
        let given = cmd.clone().try_get_matches_from(std::iter::once("connect").chain(cmdline.iter().copied())).unwrap();
        let mut out = Vec::new();
        for (k, v) in &parse(text)? {
            out.extend(key_args(text, &cmd, &given, k, v)?.into_iter().map(|a| a.into_string().unwrap()));
        }
        Ok(out)
    }

    #[test]
    fn keys_become_flags_unless_the_command_line_has_them() {
        let text = "queues = 4\nurl = [\"amqp://a\", \"amqp://b\"]\nno_offload = true\n";
        assert_eq!(args(text, &[]).unwrap(), ["--no-offload", "--queues=4", "--url=amqp://a", "--url=amqp://b"]);
        assert_eq!(args(text, &["--queues", "2"]).unwrap(), ["--no-offload", "--url=amqp://a", "--url=amqp://b"]);
        assert_eq!(args("no-offload = false", &[]).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn errors_name_the_line_and_the_key() {
        let e = args("queues = 4\n\nqueus = 2\n", &[]).unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (3, Some("queus")));
        assert!(e.describe("h1.toml").starts_with("h1.toml:3: key `queus`: not a flag"), "{}", e.describe("h1.toml"));
        let e = args("queues = [1, 2]\n", &[]).unwrap_err();
        assert_eq!((e.line, e.why.as_str()), (1, "takes one value, not a list"));
        assert_eq!(args("\n no-offload = 1", &[]).unwrap_err().line, 2);
        assert_eq!(args("config = \"x\"", &[]).unwrap_err().key.as_deref(), Some("config"));
        assert_eq!(args("[bus]\nqueues = 1\n", &[]).unwrap_err().key.as_deref(), Some("bus"));
        let e = args("queues = 4\nname = \"h1\n", &[]).unwrap_err();
        assert_eq!((e.line, e.key), (2, None));
    }
}
