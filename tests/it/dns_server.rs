//! A small authoritative DNS server for tests, on 127.0.0.1 (UDP, and TCP on the same port),
//! answering from an in-memory [`Zone`] the test builds.
//!
//! Semantics: a name with records answers them (NOERROR with an empty answer and an SOA if
//! none is of the type asked); a name without records that has names below it exists (an
//! empty non-terminal: NOERROR, no data); any other name is NXDOMAIN. Negative answers carry
//! an SOA whose TTL is the zone's negative TTL, so resolvers cache them predictably. UDP
//! answers larger than the client's payload size are truncated (TC) so the client retries
//! over TCP. Every query is counted per (name, type), so tests can observe caching.
//!
//! DNSSEC ([`Zone::signed`]): the server then plays a signed root zone holding every name,
//! with a key of its own that the test trusts ([`Zone::trust_anchor`], for
//! `delivery.dnssec_trust_anchor`). Answers carry RRSIGs made as they are sent; a name
//! without the type asked gets a NODATA answer with an NSEC record at the name itself
//! (minimal, "white lie" denial: never NXDOMAIN). [`Zone::insecure`] delegates a zone to an
//! unsigned child: its NS answers name a server, a DS query gets a signed NSEC proving there
//! is no DS, and its own records go out unsigned. [`Zone::tamper`] corrupts the signatures of
//! one name's records, which a validator must find bogus.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hickory_resolver::proto::dnssec::crypto::EcdsaSigningKey;
use hickory_resolver::proto::dnssec::rdata::{DNSSECRData, DNSKEY, NSEC, RRSIG};
use hickory_resolver::proto::dnssec::{Algorithm, DnssecSigner, SigningKey};
use hickory_resolver::proto::op::{Edns, Message, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::tlsa::{CertUsage, Matching, Selector};
use hickory_resolver::proto::rr::rdata::{A, AAAA, MX, NS, SOA, TLSA, TXT};
use hickory_resolver::proto::rr::{DNSClass, Name, RData, Record, RecordSet, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// Records by lowercase name (no trailing dot), and names that misbehave.
#[derive(Default)]
pub struct Zone {
    records: HashMap<String, Vec<(u32, RData)>>,
    servfail: HashSet<String>,
    silent: HashSet<String>,
    /// TTL of records added from now on.
    ttl: u32,
    /// DNSSEC: the root's key; `None`: nothing is signed.
    signer: Option<Arc<DnssecSigner>>,
    /// Zones delegated without DS (unsigned, provably insecure).
    insecure: HashSet<String>,
    /// Names whose RRSIGs are corrupted.
    tampered: HashSet<String>,
}

/// Record TTL unless the test sets one with [`Zone::ttl`].
const DEFAULT_TTL: u32 = 300;
/// TTL of SOA records in negative answers, and so of negative cache entries.
const NEGATIVE_TTL: u32 = 300;
/// Largest UDP answer without EDNS (RFC 1035 4.2.1).
const CLASSIC_UDP_SIZE: usize = 512;

impl Zone {
    pub fn new() -> Zone {
        Zone {
            ttl: DEFAULT_TTL,
            ..Zone::default()
        }
    }

    /// Records added after this call get this TTL (seconds).
    pub fn ttl(mut self, secs: u32) -> Zone {
        self.ttl = secs;
        self
    }

    pub fn mx(self, domain: &str, preference: u16, exchange: &str) -> Zone {
        let exchange = Name::from_ascii(format!("{exchange}.")).expect("exchange name");
        self.record(domain, RData::MX(MX::new(preference, exchange)))
    }

    /// RFC 7505: a single `0 .` record.
    pub fn null_mx(self, domain: &str) -> Zone {
        self.record(domain, RData::MX(MX::new(0, Name::root())))
    }

    pub fn a(self, host: &str, ip: &str) -> Zone {
        self.record(host, RData::A(A(ip.parse().expect("IPv4 address"))))
    }

    pub fn aaaa(self, host: &str, ip: &str) -> Zone {
        self.record(host, RData::AAAA(AAAA(ip.parse().expect("IPv6 address"))))
    }

    /// A TXT record, split into character-strings of at most 255 bytes (as a DKIM key is).
    pub fn txt(self, name: &str, value: &str) -> Zone {
        let strings = value
            .as_bytes()
            .chunks(255)
            .map(|c| String::from_utf8(c.to_vec()).expect("ASCII TXT value"))
            .collect();
        self.record(name, RData::TXT(TXT::new(strings)))
    }

    /// A TLSA record (RFC 6698): usage, selector, matching type and the association data.
    pub fn tlsa(self, name: &str, usage: u8, selector: u8, matching: u8, data: &[u8]) -> Zone {
        let tlsa = TLSA::new(
            CertUsage::from(usage),
            Selector::from(selector),
            Matching::from(matching),
            data.to_vec(),
        );
        self.record(name, RData::TLSA(tlsa))
    }

    /// Signs everything as a root zone with a new ECDSA P-256 key (see the module doc).
    pub fn signed(mut self) -> Zone {
        let pkcs8 = EcdsaSigningKey::generate_pkcs8(Algorithm::ECDSAP256SHA256).expect("key");
        let key = EcdsaSigningKey::from_pkcs8(&pkcs8, Algorithm::ECDSAP256SHA256).expect("key");
        let dnskey = DNSKEY::from_key(&key.to_public_key().expect("public key"));
        self.signer = Some(Arc::new(DnssecSigner::new(
            dnskey,
            Box::new(key),
            Name::root(),
            std::time::Duration::from_secs(7 * 86400),
        )));
        self
    }

    /// The signing key as a trust anchor file's content (zone-file DNSKEY line).
    pub fn trust_anchor(&self) -> String {
        let signer = self.signer.as_ref().expect("a signed zone");
        format!(". 3600 IN DNSKEY {}\n", signer.dnskey())
    }

    /// `zone` (and every name below it) is delegated without DS: unsigned and insecure.
    pub fn insecure(mut self, zone: &str) -> Zone {
        self.insecure.insert(zone.to_ascii_lowercase());
        self
    }

    /// The RRSIGs of `name`'s records do not verify.
    pub fn tamper(mut self, name: &str) -> Zone {
        self.tampered.insert(name.to_ascii_lowercase());
        self
    }

    /// The insecure zone `name` is in (or is), if any.
    fn insecure_zone(&self, name: &str) -> Option<&str> {
        self.insecure
            .iter()
            .find(|z| name == z.as_str() || name.ends_with(&format!(".{z}")))
            .map(String::as_str)
    }

    /// Every query for `name` answers SERVFAIL.
    pub fn servfail(mut self, name: &str) -> Zone {
        self.servfail.insert(name.to_ascii_lowercase());
        self
    }

    /// Queries for `name` are never answered (the client times out).
    pub fn silent(mut self, name: &str) -> Zone {
        self.silent.insert(name.to_ascii_lowercase());
        self
    }

    fn record(mut self, name: &str, data: RData) -> Zone {
        let ttl = self.ttl;
        self.records
            .entry(name.to_ascii_lowercase())
            .or_default()
            .push((ttl, data));
        self
    }

    /// The name has records, or names below it do.
    fn exists(&self, name: &str) -> bool {
        self.records.contains_key(name)
            || self.records.keys().any(|k| {
                k.len() > name.len() + 1
                    && k.ends_with(name)
                    && k.as_bytes()[k.len() - name.len() - 1] == b'.'
            })
    }
}

pub struct DnsServer {
    pub addr: SocketAddr,
    queries: Arc<Mutex<HashMap<(String, RecordType), usize>>>,
    tcp_queries: Arc<AtomicUsize>,
    tasks: [JoinHandle<()>; 2],
}

impl DnsServer {
    pub async fn start(zone: Zone) -> DnsServer {
        // UDP and TCP must share the port: the resolver is given one address for both.
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind UDP");
            let addr = udp.local_addr().expect("UDP address");
            match TcpListener::bind(addr).await {
                Ok(tcp) => break (udp, tcp),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => panic!("bind TCP: {e}"),
            }
        };
        DnsServer::serve(zone, udp, tcp)
    }

    /// [`DnsServer::start`] on a given loopback address and port (benches/many_domains.sh
    /// puts one on port 53 of 127.0.0.53 for Postfix, whose libc resolver knows no other
    /// port). Panics if it is taken.
    #[allow(dead_code)] // used by examples/bench_dns.rs, which includes this file
    pub async fn start_at(zone: Zone, addr: SocketAddr) -> DnsServer {
        assert!(addr.ip().is_loopback(), "loopback only: {addr}");
        let udp = UdpSocket::bind(addr).await.expect("bind UDP");
        let tcp = TcpListener::bind(addr).await.expect("bind TCP");
        DnsServer::serve(zone, udp, tcp)
    }

    fn serve(zone: Zone, udp: UdpSocket, tcp: TcpListener) -> DnsServer {
        let addr = udp.local_addr().expect("UDP address");
        let zone = Arc::new(zone);
        let queries = Arc::new(Mutex::new(HashMap::new()));
        let tcp_queries = Arc::new(AtomicUsize::new(0));
        let responder = Responder {
            zone,
            queries: queries.clone(),
            tcp_queries: tcp_queries.clone(),
        };
        let udp_task = tokio::spawn(serve_udp(udp, responder.clone()));
        let tcp_task = tokio::spawn(serve_tcp(tcp, responder));
        DnsServer {
            addr,
            queries,
            tcp_queries,
            tasks: [udp_task, tcp_task],
        }
    }

    /// Queries received so far for `name` (any case, no trailing dot) and `record_type`.
    pub fn queries(&self, name: &str, record_type: RecordType) -> usize {
        let queries = self.queries.lock().unwrap();
        let key = (name.to_ascii_lowercase(), record_type);
        queries.get(&key).copied().unwrap_or(0)
    }

    /// Queries received so far, by record type (benches/many_domains.sh reports them).
    #[allow(dead_code)] // used by examples/bench_dns.rs, which includes this file
    pub fn queries_by_type(&self) -> Vec<(RecordType, usize)> {
        let mut by_type: HashMap<RecordType, usize> = HashMap::new();
        for ((_, record_type), n) in self.queries.lock().unwrap().iter() {
            *by_type.entry(*record_type).or_default() += n;
        }
        let mut by_type: Vec<_> = by_type.into_iter().collect();
        by_type.sort_by_key(|(t, _)| u16::from(*t));
        by_type
    }

    /// Queries received over TCP so far (any name and type).
    pub fn tcp_queries(&self) -> usize {
        self.tcp_queries.load(Ordering::Relaxed)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[derive(Clone)]
struct Responder {
    zone: Arc<Zone>,
    queries: Arc<Mutex<HashMap<(String, RecordType), usize>>>,
    tcp_queries: Arc<AtomicUsize>,
}

async fn serve_udp(socket: UdpSocket, responder: Responder) {
    let mut buf = vec![0; 65535];
    while let Ok((len, peer)) = socket.recv_from(&mut buf).await {
        let Ok(request) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        let Some(mut response) = responder.answer(&request) else {
            continue;
        };
        let limit = request
            .edns
            .as_ref()
            .map_or(CLASSIC_UDP_SIZE, |e| usize::from(e.max_payload()))
            .max(CLASSIC_UDP_SIZE);
        let mut bytes = response.to_vec().expect("encode response");
        if bytes.len() > limit {
            response.answers.clear();
            response.authorities.clear();
            response.metadata.truncation = true;
            bytes = response.to_vec().expect("encode truncated response");
        }
        let _ = socket.send_to(&bytes, peer).await;
    }
}

async fn serve_tcp(listener: TcpListener, responder: Responder) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(serve_tcp_connection(stream, responder.clone()));
    }
}

/// RFC 1035 4.2.2: each message is preceded by its length as two bytes.
async fn serve_tcp_connection(mut stream: TcpStream, responder: Responder) -> io::Result<()> {
    loop {
        let len = stream.read_u16().await?;
        let mut buf = vec![0; usize::from(len)];
        stream.read_exact(&mut buf).await?;
        let request = Message::from_vec(&buf).map_err(io::Error::other)?;
        responder.tcp_queries.fetch_add(1, Ordering::Relaxed);
        if let Some(response) = responder.answer(&request) {
            let bytes = response.to_vec().map_err(io::Error::other)?;
            stream.write_u16(bytes.len() as u16).await?;
            stream.write_all(&bytes).await?;
        }
    }
}

impl Responder {
    /// The response to one query, or `None` to stay silent.
    fn answer(&self, request: &Message) -> Option<Message> {
        let query = request.queries.first()?.clone();
        let mut name = query.name().to_ascii().to_ascii_lowercase();
        if name.ends_with('.') {
            name.pop();
        }
        *self
            .queries
            .lock()
            .unwrap()
            .entry((name.clone(), query.query_type()))
            .or_default() += 1;
        let zone = &self.zone;
        if zone.silent.contains(&name) {
            return None;
        }

        let mut response = Message::response(request.metadata.id, OpCode::Query);
        response.metadata.authoritative = true;
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        if let Some(edns) = &request.edns {
            let mut ours = Edns::new();
            ours.set_max_payload(edns.max_payload());
            response.set_edns(ours);
        }
        response.add_query(query.clone());
        if zone.servfail.contains(&name) {
            response.metadata.response_code = ResponseCode::ServFail;
            return Some(response);
        }
        if let Some(signer) = &zone.signer {
            self.answer_signed(signer, &name, &query, &mut response);
            return Some(response);
        }
        let answers: Vec<Record> = zone
            .records
            .get(&name)
            .into_iter()
            .flatten()
            .filter(|(_, data)| data.record_type() == query.query_type())
            .map(|(ttl, data)| Record::from_rdata(query.name().clone(), *ttl, data.clone()))
            .collect();
        if answers.is_empty() {
            if !zone.exists(&name) {
                response.metadata.response_code = ResponseCode::NXDomain;
            }
            let soa = SOA::new(
                Name::from_ascii("ns.test.").unwrap(),
                Name::from_ascii("hostmaster.test.").unwrap(),
                1,
                3600,
                600,
                86400,
                NEGATIVE_TTL,
            );
            response.add_authority(Record::from_rdata(
                query.name().clone(),
                NEGATIVE_TTL,
                RData::SOA(soa),
            ));
        } else {
            response.add_answers(answers);
        }
        Some(response)
    }
}

impl Responder {
    /// The answer of the signed root (see the module doc).
    fn answer_signed(
        &self,
        signer: &DnssecSigner,
        name: &str,
        query: &hickory_resolver::proto::op::Query,
        response: &mut Message,
    ) {
        let zone = &self.zone;
        let qname = query.name().clone();
        let qtype = query.query_type();
        let root = Name::root();
        let sign = |records: Vec<Record>| -> Vec<Record> {
            let first = &records[0];
            let mut set = RecordSet::with_ttl(first.name.clone(), first.record_type(), first.ttl);
            for r in &records {
                set.insert(r.clone(), 0);
            }
            let inception = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
            let mut rrsig = RRSIG::from_rrset(&set, DNSClass::IN, inception, signer).expect("sign");
            if zone.tampered.contains(name) {
                let mut sig = rrsig.sig().to_vec();
                sig[0] ^= 0xff;
                rrsig = RRSIG::from_sig(rrsig.input().clone(), sig);
            }
            let mut out = records.clone();
            out.push(Record::from_rdata(
                first.name.clone(),
                first.ttl,
                RData::DNSSEC(DNSSECRData::RRSIG(rrsig)),
            ));
            out
        };
        let soa = |owner: Name| {
            let soa = SOA::new(
                Name::from_ascii("ns.test.").unwrap(),
                Name::from_ascii("hostmaster.test.").unwrap(),
                1,
                3600,
                600,
                86400,
                NEGATIVE_TTL,
            );
            Record::from_rdata(owner, NEGATIVE_TTL, RData::SOA(soa))
        };
        // The delegation of an insecure zone, as its (signed) parent tells it.
        if zone.insecure.contains(name) && qtype == RecordType::NS {
            let ns = Name::from_ascii(format!("ns.{name}.")).unwrap();
            response.add_answer(Record::from_rdata(qname, DEFAULT_TTL, RData::NS(NS(ns))));
            return;
        }
        if zone.insecure.contains(name) && qtype == RecordType::DS {
            let next = Name::from_ascii(format!("0.{name}.")).unwrap();
            let nsec = NSEC::new(next, [RecordType::NS, RecordType::RRSIG, RecordType::NSEC]);
            let nsec =
                Record::from_rdata(qname, NEGATIVE_TTL, RData::DNSSEC(DNSSECRData::NSEC(nsec)));
            response.add_authorities(sign(vec![nsec]));
            response.add_authorities(sign(vec![soa(root)]));
            return;
        }
        let present: Vec<(u32, RData)> = zone.records.get(name).cloned().unwrap_or_default();
        let answers: Vec<Record> = if qtype == RecordType::DNSKEY && query.name().is_root() {
            vec![Record::from_rdata(
                root.clone(),
                DEFAULT_TTL,
                RData::DNSSEC(DNSSECRData::DNSKEY(signer.to_dnskey())),
            )]
        } else {
            present
                .iter()
                .filter(|(_, data)| data.record_type() == qtype)
                .map(|(ttl, data)| Record::from_rdata(qname.clone(), *ttl, data.clone()))
                .collect()
        };
        if let Some(apex) = zone.insecure_zone(name) {
            // Below an insecure delegation: plain answers, the child's SOA.
            if answers.is_empty() {
                if !zone.exists(name) {
                    response.metadata.response_code = ResponseCode::NXDomain;
                }
                let apex = Name::from_ascii(format!("{apex}.")).unwrap();
                response.add_authority(soa(apex));
            } else {
                response.add_answers(answers);
            }
            return;
        }
        if !answers.is_empty() {
            response.add_answers(sign(answers));
            return;
        }
        // NODATA with an NSEC at the name itself listing what is there.
        let mut types: Vec<RecordType> = present.iter().map(|(_, d)| d.record_type()).collect();
        if query.name().is_root() {
            types.extend([RecordType::SOA, RecordType::DNSKEY]);
        }
        let next = Name::from_ascii(format!("0.{}", qname.to_ascii())).unwrap();
        let nsec = NSEC::new_cover_self(next, types);
        let nsec = Record::from_rdata(qname, NEGATIVE_TTL, RData::DNSSEC(DNSSECRData::NSEC(nsec)));
        response.add_authorities(sign(vec![nsec]));
        response.add_authorities(sign(vec![soa(root)]));
    }
}
