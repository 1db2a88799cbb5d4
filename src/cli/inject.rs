//! `tern inject`: its arguments, and the one `POST /api/v1/inject` it makes, with a raw message
//! (file or standard input) or one built from --subject/--text/--html/--attach.

use super::client::ApiClient;
use super::{EX_CONFIG, EX_DATAERR, EX_NOINPUT, EX_NOPERM, EX_TEMPFAIL, EX_UNAVAILABLE};
use crate::config::Config;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct InjectArgs {
    /// The daemon's config (`admin.address` and `admin.token_file` are read from it).
    #[arg(long, short, value_name = "FILE", help = super::CONFIG_HELP)]
    config: Option<PathBuf>,
    /// Envelope sender; "" for the null sender.
    #[arg(long)]
    from: String,
    /// Envelope recipient; repeat for several.
    #[arg(long, required = true)]
    to: Vec<String>,
    /// The raw RFC 5322 message, or "-" (the default) for standard input. LF line ends are
    /// sent as they are; the daemon turns them into CRLF.
    #[arg(conflicts_with_all = ["subject", "text", "html", "attach"])]
    file: Option<PathBuf>,
    /// Build the message instead: its Subject (From: --from, To: the recipients).
    #[arg(long)]
    subject: Option<String>,
    /// Plain-text body of the built message.
    #[arg(long)]
    text: Option<String>,
    /// File with the HTML body of the built message.
    #[arg(long)]
    html: Option<PathBuf>,
    /// File to attach to the built message; repeat for several.
    #[arg(long)]
    attach: Vec<PathBuf>,
    /// Print the API's JSON answer instead of the queue id.
    #[arg(long)]
    json: bool,
}

/// `tern inject`: one POST /api/v1/inject. API errors go to stderr with an exit code by
/// status class (401 -> 77, other 4xx -> 65, 5xx -> 75); an unreachable daemon is 69.
pub fn run(args: InjectArgs) -> ExitCode {
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let read = |path: &Path| {
        std::fs::read(path).map_err(|err| {
            eprintln!("tern: cannot read {}: {err}", path.display());
            ExitCode::from(EX_NOINPUT)
        })
    };
    // Only the admin keys are needed, so the config is not checked in full (its TLS and
    // DKIM key files may be readable by the service's user only).
    let path = match super::check_config::locate(args.config.as_deref()) {
        Ok(path) => path,
        Err(code) => return code,
    };
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{}: configuration errors:\n{errors}", path.display());
            return ExitCode::from(EX_CONFIG);
        }
    };
    let mut client = match ApiClient::from_config(&config.admin) {
        Ok(client) => client,
        Err(err) => {
            eprintln!("tern: {err}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let mut request = serde_json::json!({ "from": args.from, "to": args.to });
    let structured = args.subject.is_some()
        || args.text.is_some()
        || args.html.is_some()
        || !args.attach.is_empty();
    if structured {
        let mut message = serde_json::json!({ "to": args.to });
        if let Some(subject) = args.subject {
            message["subject"] = subject.into();
        }
        if let Some(text) = args.text {
            message["text"] = text.into();
        }
        if let Some(path) = &args.html {
            match read(path) {
                Ok(html) => message["html"] = String::from_utf8_lossy(&html).into(),
                Err(code) => return code,
            }
        }
        let mut attachments = Vec::new();
        for path in &args.attach {
            let bytes = match read(path) {
                Ok(bytes) => bytes,
                Err(code) => return code,
            };
            let filename = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "attachment".into());
            attachments.push(serde_json::json!({
                "filename": filename,
                "content_type": content_type_of(path),
                "content_base64": b64(&bytes),
            }));
        }
        if !attachments.is_empty() {
            message["attachments"] = attachments.into();
        }
        request["message"] = message;
    } else {
        let raw = match args.file.as_deref() {
            Some(path) if path != Path::new("-") => match read(path) {
                Ok(raw) => raw,
                Err(code) => return code,
            },
            _ => {
                let mut raw = Vec::new();
                if let Err(err) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut raw) {
                    eprintln!("tern: cannot read standard input: {err}");
                    return ExitCode::from(EX_NOINPUT);
                }
                raw
            }
        };
        // 8-bit content that is not UTF-8 cannot travel in a JSON string.
        match String::from_utf8(raw) {
            Ok(text) => request["raw"] = text.into(),
            Err(err) => request["raw_base64"] = b64(err.as_bytes()).into(),
        }
    }
    let answer = match client.call("POST", "/api/v1/inject", Some(&request)) {
        Ok(answer) => answer,
        Err(err) => {
            eprintln!(
                "tern: no answer from the admin API at {} (admin.address): {err}",
                client.address()
            );
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    if answer.status == 200 {
        if args.json {
            println!("{:#}", answer.body);
        } else {
            println!("{}", answer.body["id"].as_str().unwrap_or_default());
        }
        return ExitCode::SUCCESS;
    }
    if args.json {
        println!("{:#}", answer.body);
    }
    eprintln!(
        "tern: inject refused (HTTP {}): {}",
        answer.status,
        answer.error()
    );
    ExitCode::from(match answer.status {
        401 | 403 => EX_NOPERM,
        400..=499 => EX_DATAERR,
        _ => EX_TEMPFAIL,
    })
}

/// A MIME type for an attachment, from its file name's extension.
fn content_type_of(path: &Path) -> &'static str {
    let extension = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match extension.as_str() {
        "txt" | "log" => "text/plain",
        "csv" => "text/csv",
        "htm" | "html" => "text/html",
        "pdf" => "application/pdf",
        "json" => "application/json",
        "zip" => "application/zip",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "ics" => "text/calendar",
        _ => "application/octet-stream",
    }
}
