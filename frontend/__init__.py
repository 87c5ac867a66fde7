"""The Streamlit chat page: a separate client that talks to the service over HTTP."""
