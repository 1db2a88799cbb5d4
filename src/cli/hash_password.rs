//! `tern hash-password`: the argon2id hash of a password read from standard input, for
//! `auth.users` ([`crate::auth::hash_password`]).

use super::EX_DATAERR;
use std::io::BufRead;
use std::process::ExitCode;

/// Reads one line, the password, from standard input; prints its hash.
pub fn run() -> ExitCode {
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).is_err() {
        eprintln!("tern: cannot read the password from standard input");
        return ExitCode::from(EX_DATAERR);
    }
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        eprintln!("tern: empty password");
        return ExitCode::from(EX_DATAERR);
    }
    println!("{}", crate::auth::hash_password(password));
    ExitCode::SUCCESS
}
