//! Auto-reply detection (vacation and out-of-office responders), from the top-level header
//! fields only: RFC 3834 `Auto-Submitted: auto-replied`, the `X-Autoreply` / `X-Autorespond`
//! fields some responders add, `Precedence: auto_reply`, and subjects that responders use.
//!
//! Bounces also carry `Auto-Submitted: auto-replied` (Exim, Postfix), so the parser asks this
//! module only after the bounce checks failed, and never for mail from a mailer daemon.

use mail_parser::Message;

/// Lowercase subject prefixes of common responders (Outlook in several languages, Gmail,
/// Apple Mail, Zimbra, Lotus Notes and others).
const SUBJECT_PREFIXES: &[&str] = &[
    "out of office",
    "automatic reply",
    "auto-reply",
    "autoreply",
    "auto reply",
    "auto response",
    "autoresponse",
    "abwesenheitsnotiz",
    "automatische antwort",
    "réponse automatique",
    "reponse automatique",
    "absence du bureau",
    "respuesta automática",
    "respuesta automatica",
    "fuera de la oficina",
    "risposta automatica",
    "fuori sede",
    "resposta automática",
    "automatisch antwoord",
    "afwezigheidsbericht",
    "autosvar",
    "automatyczna odpowiedź",
    "vacation reply",
    "on vacation",
    "i am out of the office",
    "away from my mail",
    // Lotus Notes: "AUTO: Jane Doe is out of the office (returning 05/01/2010)".
    "auto:",
];

/// Whether `message` is an automatic reply.
pub fn is_autoreply(message: &Message<'_>) -> bool {
    let header = |name: &str| {
        message
            .header_raw(name)
            .map(|v| v.trim().to_ascii_lowercase())
    };
    if header("Auto-Submitted").is_some_and(|v| v.starts_with("auto-replied")) {
        return true;
    }
    if header("X-Autoreply").is_some() || header("X-Autorespond").is_some() {
        return true;
    }
    if header("Precedence").is_some_and(|v| v == "auto_reply") {
        return true;
    }
    let Some(subject) = message.subject() else {
        return false;
    };
    let subject = subject.trim().to_lowercase();
    SUBJECT_PREFIXES.iter().any(|p| subject.starts_with(p))
}
