//! Messages the bazaar services exchange.
