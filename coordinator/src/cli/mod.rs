//! ferryctl's library half: requests and exit codes ([`request`]), rendering resources ([`render`]), cluster
//! templates ([`template`]), `backup now` ([`backup_now`]), `get -w` ([`watch`]), `changes` ([`changes`]) and
//! completions ([`complete`]).

pub mod backup_now;
pub mod changes;
pub mod complete;
pub mod download;
pub mod pointintime;
pub mod render;
pub mod request;
pub mod restore;
pub mod template;
pub mod watch;
