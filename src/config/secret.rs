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
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read `{path}` (named by {what}_file): {e}"))?,
    };
    // Files written by editors and `echo` end in a newline that is not part of the secret.
    let value = value.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(format!("{what} is empty"));
    }
    Ok(SecretString::from(value.to_owned()))
}
