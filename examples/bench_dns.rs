//! A loopback authoritative DNS server for benches/many_domains.sh: MX records for many
//! recipient domains whose MX hosts sit under four providers' suffixes (so tern's built-in
//! shaping providers match them), each provider's hosts resolving to its own loopback sink.
//!
//! cargo run --release --example bench_dns -- DOMAINS
//!
//! Domains are `d0.bench.test` .. `d{DOMAINS-1}.bench.test`; domain i belongs to provider
//! i % 4. Each provider has a few shared MX hosts, as the big providers do (one Google
//! Workspace MX set serves millions of domains):
//!   google    aspmx{k}.l.google.com            -> 127.0.0.2
//!   microsoft bench{k}.mail.protection.outlook.com -> 127.0.0.3
//!   yahoo     mta{k}.am0.yahoodns.net          -> 127.0.0.4
//!   apple     mx{k}.mail.icloud.com            -> 127.0.0.5
//! Prints `dns_server=IP:PORT` once serving. For each line read on stdin it prints the
//! queries got so far by record type (`dns_queries type=MX n=...`), then `dns_queries end`
//! (the bench reads them between phases); when stdin closes, it prints them once more and
//! exits. Loopback only: it binds 127.0.0.1 on a free port, or the loopback address given
//! as second argument (`127.0.0.53:53`, for Postfix's libc resolver), and answers nothing
//! but these names (everything else is NXDOMAIN).

#[allow(dead_code)]
#[path = "../tests/it/dns_server.rs"]
mod dns_server;

use dns_server::{DnsServer, Zone};
use tokio::io::AsyncBufReadExt;

/// (provider, MX host pattern with `{k}`, sink address)
const PROVIDERS: [(&str, &str, &str); 4] = [
    ("google", "aspmx{k}.l.google.com", "127.0.0.2"),
    (
        "microsoft",
        "bench{k}.mail.protection.outlook.com",
        "127.0.0.3",
    ),
    ("yahoo", "mta{k}.am0.yahoodns.net", "127.0.0.4"),
    ("apple", "mx{k}.mail.icloud.com", "127.0.0.5"),
];
/// MX hosts per provider; domain i uses host (i / 4) % HOSTS as its only MX.
const HOSTS: usize = 4;

#[tokio::main]
async fn main() {
    let domains: usize = std::env::args()
        .nth(1)
        .map_or(10_000, |s| s.parse().expect("DOMAINS: a number"));
    let mut zone = Zone::new().ttl(3600);
    for (_, pattern, ip) in PROVIDERS {
        for k in 0..HOSTS {
            zone = zone.a(&pattern.replace("{k}", &k.to_string()), ip);
        }
    }
    for i in 0..domains {
        let (_, pattern, _) = PROVIDERS[i % 4];
        let host = pattern.replace("{k}", &((i / 4) % HOSTS).to_string());
        zone = zone.mx(&format!("d{i}.bench.test"), 10, &host);
    }
    let server = match std::env::args().nth(2) {
        Some(addr) => {
            let addr: std::net::SocketAddr = addr.parse().expect("ADDR: ip:port");
            DnsServer::start_at(zone, addr).await
        }
        None => DnsServer::start(zone).await,
    };
    println!("dns_server={}", server.addr);
    // Runs until the caller closes stdin; each line asks for the counts so far.
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(_)) = lines.next_line().await {
        print_counts(&server);
    }
    print_counts(&server);
}

fn print_counts(server: &DnsServer) {
    for (record_type, n) in server.queries_by_type() {
        println!("dns_queries type={record_type} n={n}");
    }
    println!("dns_queries end");
}
