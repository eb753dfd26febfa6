"""The simulator's own credentials: a demo API key and RSA key pair.

These are NOT secrets. They exist so ``MPESA_ENVIRONMENT=simulator`` works with no configuration:
the simulator decrypts bearer tokens with this private key, and a client left without
``MPESA_API_KEY``/``MPESA_PUBLIC_KEY`` in the simulator environment uses this API key and public
key. Never use them against Vodacom.
"""

SIMULATOR_API_KEY = "simulator-demo-api-key-not-secret"
SIMULATOR_SERVICE_PROVIDER_CODE = "171717"
SIMULATOR_INITIATOR_IDENTIFIER = "MPesa2018"
SIMULATOR_SECURITY_CREDENTIAL = "Mpesa2019"

# Single-line base64 DER, the form the Vodacom portal shows.
SIMULATOR_PUBLIC_KEY = (
    "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAxSoAB62qWtPjaBSZrwLw9KvV+QK7eHmlSCUgIUjNfWUD"
    "1k/6BXXCouus4vOxBkrubrC3MEeY1HyUIeFZbKrBkY2vJ2pLbRwsDaSaNbLHoaX+haGYshk/Gxbq7ziq3ndkQETa"
    "0Ac1ApBGSc0iD8NueGnEcBOZQ+0D43IWkFfhmS63PyzCoQCSFxjzZhjkt9to+dBwnii+H85KW1S7u/72Acr6mhV0"
    "sT9QrR8sGBEM75f2Co1XdGrqULCSSy+wTjvEjC1ia45Y2gbdxG72AD6NLH7bFgSHxeir384ls5iZLBI+L9oe64FX"
    "JXy+kuQhguS1D5nbmJCeua4ji4B4Xjfn4QIDAQAB"
)

SIMULATOR_PRIVATE_KEY_PEM = """\
-----BEGIN PRIVATE KEY-----
MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQDFKgAHrapa0+No
FJmvAvD0q9X5Art4eaVIJSAhSM19ZQPWT/oFdcKi66zi87EGSu5usLcwR5jUfJQh
4VlsqsGRja8nakttHCwNpJo1ssehpf6FoZiyGT8bFurvOKred2RARNrQBzUCkEZJ
zSIPw254acRwE5lD7QPjchaQV+GZLrc/LMKhAJIXGPNmGOS322j50HCeKL4fzkpb
VLu7/vYByvqaFXSxP1CtHywYEQzvl/YKjVd0aupQsJJLL7BOO8SMLWJrjljaBt3E
bvYAPo0sftsWBIfF6KvfziWzmJksEj4v2h7rgVclfL6S5CGC5LUPmduYkJ65riOL
gHheN+fhAgMBAAECggEAO7SaSbj3a4XayXvjhjH30b/vjfab2sHLoWtMrYekYqKi
ZNXXOqwMgtWnhxqQsv0h8vckokQsLbyEBzZ8pAGZmIA1WFRB/wqW9JKx+CzpczQX
PVRQLy6iA4wPHN4mMDQrcaLoODLWhK43+sVZ2TgvTduJlv74XK97i/bSimdyc7Y/
pqwDJWbWhRhkAEhgFmaEKegdlJ6JDDp/ciJvnilXDdBrnK049fNz084gbawYJ30F
Ry6XGXaENb1pgo5JQciK+l2ZNncKDhO1us9qO9F4jLzZEz5qTtwpBVIfyX77R5nf
B/Ztuu7HHn+EtzrQp53A0E+5Y3U63BJSDRnXxfvxeQKBgQDrCprva4/ysu4mDeyV
sR29UBGs2Xw0d16S0D7D5tugenVH8IMwXF6zrY8NXU1/GMN1yua6+Xh4bvOKskpQ
uXU+Qwdx1bdbhId4bxMGZqiRwVqf4CCrgOpJ+CEDfuTyt/ckKczFFcZNZ67oTU1A
B/20cTK6zKPetC4AOxK2h4jQQwKBgQDWvsBk2YUBK0T5PrsS2pd0mnFms/sSt2Ey
T5h8la/RX4IoCDdBA6HSfQxWZ9cclqdX7Dg9sgGeYZNZRrRBUYVfhkH9BPolfPJi
BkWA4czTRev+Hj1CLvs8jiPldHdSrYTQ/WQJ0NKDn6Mf5Ds4PEIKUXbegS2akiO5
wOmHH4RnCwKBgH+UKRcuBluRXg0P38w88EyTCpUNFAsShCYinP8O70XDUqey2DLG
4Kyc15pEe80yLt5gPS9ePFL6vn0ZW5dHo2khTwguHjGx1Sq899GwpW1AS6WeLX2K
IyH1ak4QccuBqcdaXQjZUeMwFVOIqhbIf6CTFRsp+wTmPlXnureTB+MrAoGAaVbg
4ZeiGtSy3ODcu37m1Jf+ELcw7hluYFOTJWn3+Oi03BZLpGS3uJ0GtEvzxV5RcFu7
qufqy1pqAV0hhvkKR7WAITGT01fbPiJ9bZ9V7j1aailDO3f4XdgL276p2bCseigS
Lo509YQVbMt0ET3d11nmyXbse+o8BB6Rb2sSc8kCgYAaGWgYHwEG/0JnmsnDHlVY
HsjGfSL2yyH0AoafaGiPkA33qKmQApCDFr3HR7pZQr0cZwsR1ZH9fHRFX+rfSxFD
zLULDH603hXukRojOpJBCAwrMxo9bV0F99a9GUKtjlEZDGn4e2bcQSxkfl+fBYzt
q5OLLujuCep1EHwQcd3rwg==
-----END PRIVATE KEY-----
"""
