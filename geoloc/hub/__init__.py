"""The Hugging Face Hub: `geoloc publish` (`publish`), the remote code a published repo carries and the generated
copies of the shared modules (`remote_code`), `geoloc convert` of the official GeoCLIP release (`convert`) and
`geoloc space` (`space`)."""
