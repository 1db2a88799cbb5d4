//! A fake OpenAI-compatible model server for load runs of the sidecar: HTTPS on loopback
//! (rustls, a throwaway CA and a `localhost` certificate from rcgen, ALPN h2 and http/1.1),
//! `POST /v1/chat/completions` answered after DELAY_MS with slots naming the segment and the
//! variant asked about, at most CONCURRENCY calls at once (more get a 429). It writes the CA
//! certificate to CA_FILE (for `sidecar.model.ca_file`) and prints the number of calls every
//! second it changed.
//!
//! cargo run --release --example fake_model -- PORT CA_FILE [DELAY_MS] [CONCURRENCY]

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: fake_model PORT CA_FILE [DELAY_MS] [CONCURRENCY]");
        std::process::exit(64);
    }
    let port: u16 = args[0].parse().expect("PORT");
    let delay = Duration::from_millis(args.get(2).map_or(1000, |a| a.parse().expect("DELAY_MS")));
    let allowed: usize = args.get(3).map_or(16, |a| a.parse().expect("CONCURRENCY"));

    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fake model CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    std::fs::write(&args[1], ca.pem()).expect("write CA_FILE");

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind 127.0.0.1:PORT");
    let calls = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    {
        let calls = calls.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = calls.load(Ordering::SeqCst);
                if now != last {
                    println!("fake_model: {now} calls");
                    last = now;
                }
            }
        });
    }
    loop {
        let (tcp, _) = listener.accept().await.expect("accept");
        let (acceptor, calls, in_flight) = (acceptor.clone(), calls.clone(), in_flight.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let service = hyper::service::service_fn(
                move |req: hyper::Request<hyper::body::Incoming>| {
                    let (calls, in_flight) = (calls.clone(), in_flight.clone());
                    async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        calls.fetch_add(1, Ordering::SeqCst);
                        let busy = in_flight.fetch_add(1, Ordering::SeqCst) >= allowed;
                        let response = if busy {
                            hyper::Response::builder()
                                .status(429)
                                .body(Full::new(Bytes::new()))
                                .unwrap()
                        } else {
                            tokio::time::sleep(delay).await;
                            let request: serde_json::Value =
                                serde_json::from_slice(&body).unwrap_or_default();
                            let user: serde_json::Value = request["messages"][1]["content"]
                                .as_str()
                                .and_then(|c| serde_json::from_str(c).ok())
                                .unwrap_or_default();
                            let field =
                                |k: &str| user["recipient"][k].as_str().unwrap_or("-").to_owned();
                            let content = serde_json::json!({
                                "subject": format!("Offer {} {}", field("segment"), field("variant")),
                                "opening": format!("Written for {}.", field("segment")),
                            });
                            let answer = serde_json::json!({
                                "choices": [{"index": 0, "message": {"role": "assistant", "content": content.to_string()}}],
                                "usage": {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52},
                            });
                            hyper::Response::new(Full::new(Bytes::from(answer.to_string())))
                        };
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, hyper::Error>(response)
                    }
                },
            );
            let io = TokioIo::new(tls);
            if h2 {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, service)
                    .await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            }
        });
    }
}
