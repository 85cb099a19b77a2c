//! The HTTP/1.1 wire rules, once, for every side that speaks HTTP/1.1:
//! the server loop (`proxy::server::h1_loop`), the guard on connections handed to hyper
//! ([`guard`]), and the client to plain-HTTP upstreams
//! (`upstream::h1_client`). A leaf: it imports neither side.
//!
//! How bytes move through it. Heads are found and parsed by httparse into
//! slices of the read buffer; [`head`] holds the limits on a head and the
//! header lines kept as the head's own bytes ([`head::RelayedHeaders`]),
//! and [`names`] turns a header's name and value into `http` types. The
//! framing headers of a parsed head go through [`framing`]: its
//! [`framing::ContentLength`] and [`framing::Connection`] folds read the
//! field values line by line as they pass, and its transfer-coding checks
//! say whether a body is chunked; what they decide is how many body bytes
//! follow the head. A chunked body's size lines go through
//! [`chunked::parse_size`] on the way in, and [`chunked::push_size`]
//! writes them on the way out. Numbers written into heads go through
//! [`framing::push_decimal`]. Nothing here reads a socket or allocates
//! per header: each side keeps its own buffers and loop, and asks this
//! module what the bytes mean.
//!
//! The rules follow RFC 9112 as hyper applies them, because hyper serves
//! what the server loop hands it and speaks to TLS upstreams: a side that
//! read framing more leniently than hyper would see a different message
//! boundary than the peer it talks to.

pub mod chunked;
pub mod framing;
pub mod guard;
pub mod head;
pub mod names;
