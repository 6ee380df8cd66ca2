//! Secrets come from an environment variable or a file, never from the connector file itself,
//! and are held as `SecretString` so that they print as `[REDACTED]` in logs and debug output.

use secrecy::SecretString;

/// Reads a secret from the environment variable `env` or the file `file` (exactly one).
/// `what` names the secret in messages; the value itself never appears in one.
pub fn load(env: Option<&str>, file: Option<&str>, what: &str) -> Result<SecretString, String> {
    let value = match (env, file) {
        (Some(_), Some(_)) => {
            return Err(format!("set one of {what}_env and {what}_file, not both"));
        }
        (None, None) => return Err(format!("{what}_env or {what}_file is required")),
        (Some(var), None) => std::env::var(var).map_err(|_| {
            format!("environment variable `{var}` (named by {what}_env) is not set or not UTF-8")
        })?,
        (None, Some(path)) => read_small(path)
            .map_err(|e| format!("cannot read `{path}` (named by {what}_file): {e}"))?,
    };
    // Files written by editors and `echo` end in a newline that is not part of the secret.
    let value = value.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(format!("{what} is empty"));
    }
    Ok(SecretString::from(value.to_owned()))
}

/// No secret is longer than this; a path to `/dev/zero` or a log file is a mistake to report,
/// not a file to read to its end.
const LONGEST_SECRET: u64 = 64 * 1024;

fn read_small(path: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(LONGEST_SECRET + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > LONGEST_SECRET {
        return Err(std::io::Error::other(format!(
            "longer than {} KiB: not a secret",
            LONGEST_SECRET / 1024
        )));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_file_is_read_only_up_to_a_bound() {
        let e = load(None, Some("/dev/zero"), "client_secret").unwrap_err();
        assert!(e.contains("longer than 64 KiB"), "{e}");
    }
}
