// Download decoding (JSON): after the click's handler has written the file (into a hidden gr.File), save it.
(file) => { if (file && file.url) Object.assign(document.createElement('a'),
                                              {href: file.url, download: file.orig_name || 'decoding.json'}).click(); }
