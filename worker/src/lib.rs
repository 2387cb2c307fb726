//! moeshard worker
